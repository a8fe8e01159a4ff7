//! A super stream over HTTP: declared with `PUT /api/exchanges` (type
//! `x-super-stream`), its partitions and consumer groups at `GET
//! /api/exchanges/{vhost}/{name}/partitions` (404 and 409 too), and its
//! deletion taking the partitions with it.

#![allow(clippy::unwrap_used)] // a test helper that fails should panic

mod common;

use std::time::Duration;

use common::TestServer;
use serde_json::json;
use tern_broker::super_stream::partition_of;
use tern_broker::{Channel, ChannelEvent, ConsumeOptions, Delivery, FieldValue};

async fn next_delivery(ch: &mut Channel) -> Delivery {
    match tokio::time::timeout(Duration::from_secs(5), ch.recv()).await {
        Ok(Some(ChannelEvent::Delivery(d))) => d,
        other => panic!("expected a delivery, got {other:?}"),
    }
}

fn member() -> ConsumeOptions {
    ConsumeOptions {
        arguments: [
            (
                "x-single-active-consumer".to_string(),
                FieldValue::Bool(true),
            ),
            (
                "x-stream-consumer-name".to_string(),
                FieldValue::String("workers".into()),
            ),
            (
                "x-stream-offset".to_string(),
                FieldValue::String("first".into()),
            ),
        ]
        .into_iter()
        .collect(),
        ..ConsumeOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_and_group_assignments_over_http() {
    let t = TestServer::start().await;
    // A bad partition count is a 400 naming the argument.
    let reply = t
        .client
        .put(
            "/api/exchanges/%2F/bad",
            json!({"type": "x-super-stream", "arguments": {"x-partitions": 0}}),
        )
        .await;
    reply.expect(400);
    let reason = reply.json()["reason"].as_str().unwrap().to_string();
    assert!(reason.contains("x-partitions"), "{reason}");
    t.client
        .put(
            "/api/exchanges/%2F/orders",
            json!({"type": "x-super-stream", "arguments": {"x-partitions": 3}}),
        )
        .await
        .expect(201);
    for key in ["a", "b", "c", "d"] {
        let v = t
            .client
            .post(
                "/api/exchanges/%2F/orders/publish",
                json!({"routing_key": key, "payload": key, "payload_encoding": "string", "properties": {}}),
            )
            .await
            .expect(200)
            .json();
        assert_eq!(v["routed"], true);
    }
    let mut counts = [0u64; 3];
    for key in ["a", "b", "c", "d"] {
        counts[partition_of(key.as_bytes(), 3) as usize] += 1;
    }

    // Two members, each on every partition: the first holds every partition
    // until the second joins; then 0 and 2 stay with it and 1 moves.
    let conn = t.broker.new_connection_id();
    let mut chans = Vec::new();
    for m in ["m0", "m1"] {
        let mut ch = t.broker.open_channel("/", conn).unwrap();
        ch.qos(10, false);
        for p in 0..3 {
            let mut opts = member();
            opts.consumer_tag = format!("{m}.{p}");
            ch.consume(&format!("orders-{p}"), opts).unwrap();
        }
        if m == "m0" {
            // Acked, so no in-flight message holds the hand-over up.
            for _ in 0..4 {
                let d = next_delivery(&mut ch).await;
                ch.ack(d.tag, false).unwrap();
            }
        }
        chans.push(ch);
    }
    let body = t
        .client
        .get("/api/exchanges/%2F/orders/partitions")
        .await
        .expect(200)
        .json();
    assert_eq!(body["name"], "orders");
    assert_eq!(body["partition_key_header"], json!(null));
    let partitions = body["partitions"].as_array().unwrap();
    assert_eq!(partitions.len(), 3);
    for (p, part) in partitions.iter().enumerate() {
        assert_eq!(part["index"], p);
        assert_eq!(part["queue"], format!("orders-{p}"));
        assert_eq!(part["exists"], true);
        assert_eq!(part["messages"], counts[p]);
        let g = &part["groups"][0];
        assert_eq!(g["name"], "workers");
        assert_eq!(g["members"], json!([format!("m0.{p}"), format!("m1.{p}")]));
        assert_eq!(g["active"], format!("m{}.{p}", p % 2));
        assert_eq!(g["committed"], counts[p]);
    }

    // Two members of one group on a partition are one lag series, not two.
    let reply = t.client.with_auth(None).get("/metrics").await;
    reply.expect(200);
    let text = String::from_utf8(reply.body.to_vec()).unwrap();
    for p in 0..3 {
        let series = format!(
            "tern_stream_consumer_lag{{vhost=\"/\",queue=\"orders-{p}\",consumer=\"workers\"}} 0"
        );
        assert_eq!(text.lines().filter(|l| *l == series).count(), 1, "{text}");
    }

    // Not a super stream: 409; no such exchange: 404.
    t.client
        .get("/api/exchanges/%2F/amq.direct/partitions")
        .await
        .expect(409);
    t.client
        .get("/api/exchanges/%2F/nothing/partitions")
        .await
        .expect(404);

    // Deleting the exchange deletes its partitions.
    drop(chans);
    t.client
        .delete("/api/exchanges/%2F/orders")
        .await
        .expect(204);
    t.client.get("/api/queues/%2F/orders-0").await.expect(404);
}
