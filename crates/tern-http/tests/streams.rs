//! Stream offsets per consumer over HTTP: `GET
//! /api/queues/{vhost}/{name}/offsets` (named consumers attached and away,
//! unnamed ones, 404 and 409) and the `tern_stream_consumer_lag` gauge in
//! `/metrics`.

#![allow(clippy::unwrap_used)] // a test helper that fails should panic

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::TestServer;
use prometheus_parse::{Scrape, Value};
use serde_json::json;
use tern_broker::{
    Channel, ChannelEvent, ConsumeOptions, Delivery, ExchangeName, FieldValue, Message, Properties,
};

async fn next_delivery(ch: &mut Channel) -> Delivery {
    match tokio::time::timeout(Duration::from_secs(5), ch.recv()).await {
        Ok(Some(ChannelEvent::Delivery(d))) => d,
        other => panic!("expected a delivery, got {other:?}"),
    }
}

fn consume(args: &[(&str, &str)]) -> ConsumeOptions {
    ConsumeOptions {
        arguments: args
            .iter()
            .map(|(k, v)| (k.to_string(), FieldValue::String(v.to_string())))
            .collect(),
        ..ConsumeOptions::default()
    }
}

fn lag(scrape: &Scrape, consumer: &str) -> Option<f64> {
    let samples: Vec<_> = scrape
        .samples
        .iter()
        .filter(|s| {
            s.metric == "tern_stream_consumer_lag"
                && s.labels.get("queue") == Some("events")
                && s.labels.get("consumer") == Some(consumer)
        })
        .collect();
    assert!(
        samples.len() <= 1,
        "{consumer} appears {} times",
        samples.len()
    );
    samples.first().map(|s| match s.value {
        Value::Gauge(v) => v,
        ref other => panic!("not a gauge: {other:?}"),
    })
}

async fn scrape(t: &TestServer) -> Scrape {
    let reply = t.client.with_auth(None).get("/metrics").await;
    reply.expect(200);
    let text = String::from_utf8(reply.body.to_vec()).unwrap();
    Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_and_lag_per_stream_consumer() {
    let t = TestServer::start().await;
    t.client
        .put(
            "/api/queues/%2F/events",
            json!({"arguments": {"x-queue-type": "stream"}}),
        )
        .await
        .expect(201);
    for i in 0..5 {
        let m = Message {
            exchange: ExchangeName::default_exchange(),
            routing_key: "events".into(),
            properties: Properties::default(),
            body: Bytes::from(format!("m{i}")),
        };
        t.broker.publish("/", m).unwrap().confirmed().await.unwrap();
    }
    let conn = t.broker.new_connection_id();
    let mut billing = t.broker.open_channel("/", conn).unwrap();
    billing.qos(10, false);
    billing
        .consume(
            "events",
            consume(&[
                ("x-stream-consumer-name", "billing"),
                ("x-stream-offset", "first"),
            ]),
        )
        .unwrap();
    let d0 = next_delivery(&mut billing).await;
    let d1 = next_delivery(&mut billing).await;
    billing.ack(d1.tag, true).unwrap();
    drop(d0);

    let body = t
        .client
        .get("/api/queues/%2F/events/offsets")
        .await
        .expect(200)
        .json();
    assert_eq!(
        (body["first"].clone(), body["end"].clone()),
        (json!(0), json!(5))
    );
    let c = &body["consumers"][0];
    assert_eq!(c["name"], "billing");
    assert_eq!(c["committed"], 2);
    assert_eq!(c["lag"], 3);
    assert!(c["consumer_tag"].is_string());
    assert_eq!(lag(&scrape(&t).await, "billing"), Some(3.0));

    // Away, a named consumer's committed offset and lag stay visible.
    drop(billing);
    let body = t
        .client
        .get("/api/queues/%2F/events/offsets")
        .await
        .expect(200)
        .json();
    assert_eq!(body["consumers"].as_array().unwrap().len(), 1);
    assert_eq!(body["consumers"][0]["consumer_tag"], json!(null));
    assert_eq!(body["consumers"][0]["next"], json!(null));
    assert_eq!(body["consumers"][0]["committed"], 2);

    // An unnamed consumer reports its lag from what it was sent.
    let mut tail = t.broker.open_channel("/", conn).unwrap();
    tail.qos(10, false);
    let tag = tail
        .consume("events", consume(&[("x-stream-offset", "next")]))
        .unwrap();
    let s = scrape(&t).await;
    assert_eq!(lag(&s, &tag), Some(0.0));
    assert_eq!(lag(&s, "billing"), Some(3.0));

    // Not a stream: 409; no such queue: 404.
    t.client
        .put("/api/queues/%2F/plain", json!({}))
        .await
        .expect(201);
    t.client
        .get("/api/queues/%2F/plain/offsets")
        .await
        .expect(409);
    t.client
        .get("/api/queues/%2F/nothing/offsets")
        .await
        .expect(404);
}
