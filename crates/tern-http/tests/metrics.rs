//! `/metrics` scraped and parsed as Prometheus text: the recorder's
//! counters (rendered through a `MetricsSource`, as `tern serve` wires it)
//! and the per-queue gauges read from the broker at scrape time, exactly
//! once per queue, gone with the queue.

#![allow(clippy::unwrap_used)] // a test helper that fails should panic

mod common;

use bytes::Bytes;
use common::TestServer;
use metrics_exporter_prometheus::PrometheusBuilder;
use prometheus_parse::{Sample, Scrape, Value};
use serde_json::json;
use tern_broker::{ExchangeName, Message, Properties};
use tern_http::{HttpConfig, MetricsSource};

async fn scrape(t: &TestServer) -> Scrape {
    let reply = t.client.with_auth(None).get("/metrics").await;
    reply.expect(200);
    let content_type = reply.headers.get("content-type").unwrap().to_str().unwrap();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    let text = String::from_utf8(reply.body.to_vec()).unwrap();
    Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap()
}

/// The samples of `metric` for `queue` in vhost `/`.
fn of<'a>(scrape: &'a Scrape, metric: &str, queue: &str) -> Vec<&'a Sample> {
    scrape
        .samples
        .iter()
        .filter(|s| {
            s.metric == metric
                && s.labels.get("queue") == Some(queue)
                && s.labels.get("vhost") == Some("/")
        })
        .collect()
}

fn gauge(scrape: &Scrape, metric: &str, queue: &str) -> Option<f64> {
    let samples = of(scrape, metric, queue);
    assert!(
        samples.len() <= 1,
        "{metric} for {queue} appears {} times",
        samples.len()
    );
    samples.first().map(|s| match s.value {
        Value::Gauge(v) => v,
        ref other => panic!("{metric} is not a gauge: {other:?}"),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_queue_depths_and_counters() {
    let handle = PrometheusBuilder::new().install_recorder().unwrap();
    let source = MetricsSource::new(move || handle.render());
    let t = TestServer::start_with(HttpConfig::default().with_metrics(source)).await;

    t.client
        .put("/api/queues/%2F/work", json!({}))
        .await
        .expect(201);
    for i in 0..3 {
        let m = Message {
            exchange: ExchangeName::default_exchange(),
            routing_key: "work".into(),
            properties: Properties::default(),
            body: Bytes::from(format!("m{i}")),
        };
        t.broker.publish("/", m).unwrap().confirmed().await.unwrap();
    }
    // One message held unacked by a channel.
    let mut ch = t
        .broker
        .open_channel("/", t.broker.new_connection_id())
        .unwrap();
    let held = ch.get("work", false).unwrap().unwrap();

    let s = scrape(&t).await;
    assert_eq!(gauge(&s, "tern_queue_messages_ready", "work"), Some(2.0));
    assert_eq!(gauge(&s, "tern_queue_messages_unacked", "work"), Some(1.0));
    assert_eq!(gauge(&s, "tern_queue_consumers", "work"), Some(0.0));
    assert!(s.docs.contains_key("tern_queue_messages_ready"));
    // The broker describes its counters; the recorder prints the help.
    assert!(s.docs.contains_key("tern_queue_messages_published_total"));
    // The broker's counters come through the recorder.
    let published = of(&s, "tern_queue_messages_published_total", "work");
    assert_eq!(published.len(), 1);
    assert!(
        matches!(published[0].value, Value::Counter(v) | Value::Untyped(v) if v == 3.0),
        "{:?}",
        published[0].value
    );

    // The overview sums the same counters.
    let stats = t.client.get("/api/overview").await.expect(200).json()["message_stats"].clone();
    assert_eq!(stats["published"], 3.0);
    assert_eq!(stats["delivered"], 1.0);
    assert_eq!(stats["acked"], 0.0);

    ch.ack(held.tag, false).unwrap();
    let s = scrape(&t).await;
    assert_eq!(gauge(&s, "tern_queue_messages_ready", "work"), Some(2.0));
    assert_eq!(gauge(&s, "tern_queue_messages_unacked", "work"), Some(0.0));

    // Dead-letter queues have their depth; nothing is connected.
    t.client
        .put("/api/queues/%2F/work.dlq", json!({}))
        .await
        .expect(201);
    let m = Message {
        exchange: ExchangeName::default_exchange(),
        routing_key: "work.dlq".into(),
        properties: Properties::default(),
        body: Bytes::from_static(b"dead"),
    };
    t.broker.publish("/", m).unwrap().confirmed().await.unwrap();
    let s = scrape(&t).await;
    assert_eq!(gauge(&s, "tern_dlq_messages", "work.dlq"), Some(1.0));
    assert_eq!(gauge(&s, "tern_dlq_messages", "work"), None);
    let connections: Vec<&Sample> = s
        .samples
        .iter()
        .filter(|x| x.metric == "tern_connections")
        .collect();
    assert_eq!(connections.len(), 1);
    assert!(matches!(connections[0].value, Value::Gauge(v) if v == 0.0));

    // A deleted queue's depth series go with it.
    t.client.delete("/api/queues/%2F/work").await.expect(204);
    let s = scrape(&t).await;
    assert_eq!(gauge(&s, "tern_queue_messages_ready", "work"), None);
    assert_eq!(gauge(&s, "tern_queue_consumers", "work"), None);
}
