//! `/metrics` series read from the broker at scrape time that need no
//! recorder: open channels per connection, and the storage's fsync latency
//! histogram. A file of its own, because the metrics recorder is global to
//! the process and `metrics.rs` counts every publish it sees.

#![allow(clippy::unwrap_used)] // a test helper that fails should panic

mod common;

use bytes::Bytes;
use common::TestServer;
use prometheus_parse::{Sample, Scrape, Value};
use serde_json::json;
use tern_broker::{ConnectionMeta, ConnectionTraffic, ExchangeName, Message, Properties};

async fn scrape(t: &TestServer) -> Scrape {
    let reply = t.client.with_auth(None).get("/metrics").await;
    reply.expect(200);
    let text = String::from_utf8(reply.body.to_vec()).unwrap();
    Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_fsync_latency_and_channels_per_connection() {
    let t = TestServer::start().await;
    t.client
        .put("/api/queues/%2F/durable", json!({}))
        .await
        .expect(201);
    let m = Message {
        exchange: ExchangeName::default_exchange(),
        routing_key: "durable".into(),
        properties: Properties {
            delivery_mode: Some(2),
            ..Properties::default()
        },
        body: Bytes::from_static(b"kept"),
    };
    t.broker.publish("/", m).unwrap().confirmed().await.unwrap();

    let id = t.broker.new_connection_id();
    let _connection = t.broker.register_connection(
        id,
        ConnectionMeta {
            peer: "127.0.0.1:50000".parse().unwrap(),
            local: "127.0.0.1:5672".parse().unwrap(),
            user: "guest".into(),
            vhost: "/".into(),
            protocol: "AMQP 0-9-1".into(),
            traffic: ConnectionTraffic::default(),
        },
    );
    let _one = t.broker.open_channel("/", id).unwrap();
    let _two = t.broker.open_channel("/", id).unwrap();

    let s = scrape(&t).await;
    let channels: Vec<&Sample> = s
        .samples
        .iter()
        .filter(|x| x.metric == "tern_connection_channels")
        .collect();
    assert_eq!(channels.len(), 1, "one series per connection");
    assert_eq!(channels[0].labels.get("user"), Some("guest"));
    assert!(matches!(channels[0].value, Value::Gauge(v) if v == 2.0));

    let fsyncs: Vec<&Sample> = s
        .samples
        .iter()
        .filter(|x| x.metric == "tern_storage_fsync_duration_seconds")
        .collect();
    assert_eq!(fsyncs.len(), 1, "{fsyncs:?}");
    let Value::Histogram(buckets) = &fsyncs[0].value else {
        panic!("not a histogram: {:?}", fsyncs[0].value);
    };
    let inf = buckets.last().unwrap();
    assert!(inf.less_than.is_infinite());
    assert!(
        inf.count >= 1.0,
        "the durable publish was fsynced: {buckets:?}"
    );
    assert!(
        buckets.windows(2).all(|w| w[0].count <= w[1].count),
        "buckets are cumulative: {buckets:?}"
    );
}
