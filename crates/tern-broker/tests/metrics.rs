//! The broker reports its work through the `metrics` facade: any recorder
//! (a Prometheus exporter, or this test's) sees per-queue and per-exchange
//! counters and gauges with Prometheus-style names and labels.

#![allow(clippy::unwrap_used)] // a test helper that fails should panic

use std::time::Duration;

use bytes::Bytes;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use metrics_util::CompositeKey;
use tern_broker::*;

type Metrics = Vec<(CompositeKey, DebugValue)>;

/// Reads one metric out of a snapshot (taking a snapshot resets counters,
/// so the test takes one and queries it).
fn value(snapshot: &Metrics, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    snapshot.iter().find_map(|(key, v)| {
        let key = key.key();
        let matches = key.name() == name
            && labels
                .iter()
                .all(|(k, want)| key.labels().any(|l| l.key() == *k && l.value() == *want));
        matches.then(|| match v {
            DebugValue::Counter(c) => *c as f64,
            DebugValue::Gauge(g) => g.into_inner(),
            DebugValue::Histogram(_) => f64::NAN,
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_and_exchanges_report_their_traffic_and_depth() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let conn = broker.new_connection_id();
    broker
        .declare_queue("/", QueueDeclare::new("metered"), conn)
        .await
        .unwrap();
    for i in 0..3 {
        let m = Message {
            exchange: ExchangeName::default_exchange(),
            routing_key: "metered".into(),
            properties: Properties::default(),
            body: Bytes::from(vec![b'x'; 10 + i]),
        };
        broker.publish("/", m).unwrap().confirmed().await.unwrap();
    }
    let unroutable = Message {
        exchange: ExchangeName::new("amq.direct").unwrap(),
        routing_key: "nowhere".into(),
        properties: Properties::default(),
        body: Bytes::new(),
    };
    broker
        .publish("/", unroutable)
        .unwrap()
        .confirmed()
        .await
        .unwrap();

    let mut ch = broker.open_channel("/", conn).unwrap();
    let first = ch.get("metered", false).unwrap().unwrap();
    ch.ack(first.tag, false).unwrap();
    let second = ch.get("metered", false).unwrap().unwrap();
    ch.reject(second.tag, false).unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let snapshotter: Metrics = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(k, _, _, v)| (k, v))
        .collect();

    let q = [("vhost", "/"), ("queue", "metered")];
    assert_eq!(
        value(&snapshotter, "tern_queue_messages_published_total", &q),
        Some(3.0)
    );
    assert_eq!(
        value(&snapshotter, "tern_queue_published_bytes_total", &q),
        Some(33.0)
    );
    assert_eq!(
        value(&snapshotter, "tern_queue_messages_delivered_total", &q),
        Some(2.0)
    );
    assert_eq!(
        value(&snapshotter, "tern_queue_messages_acked_total", &q),
        Some(1.0)
    );
    let rejected = [("vhost", "/"), ("queue", "metered"), ("reason", "rejected")];
    assert_eq!(
        value(&snapshotter, "tern_queue_messages_dropped_total", &rejected),
        Some(1.0)
    );
    assert_eq!(
        value(&snapshotter, "tern_queue_messages_ready", &q),
        Some(1.0)
    );
    assert_eq!(
        value(&snapshotter, "tern_queue_messages_unacked", &q),
        Some(0.0)
    );
    let x = [("vhost", "/"), ("exchange", "amq.direct")];
    assert_eq!(
        value(&snapshotter, "tern_exchange_messages_published_total", &x),
        Some(1.0)
    );
    assert_eq!(
        value(&snapshotter, "tern_exchange_messages_unroutable_total", &x),
        Some(1.0)
    );
}
