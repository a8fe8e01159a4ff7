//! Message rates: the sampled counters in `message_stats` of the overview,
//! queues and exchanges (RabbitMQ's shape, `*_details.rate`), and the
//! history of `GET /api/rates`, whose rates times their intervals add up
//! to the messages that were counted. Sampled every 100 ms here.

#![allow(clippy::unwrap_used)] // a test helper that fails should panic

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::TestServer;
use metrics_exporter_prometheus::PrometheusBuilder;
use serde_json::{json, Value};
use tern_broker::{ExchangeName, Message, Properties};
use tern_http::{HttpConfig, MetricsSource};

async fn publish(t: &TestServer, exchange: &str, key: &str, n: usize) {
    for i in 0..n {
        let m = Message {
            exchange: ExchangeName::new(exchange).unwrap(),
            routing_key: key.into(),
            properties: Properties::default(),
            body: Bytes::from(format!("m{i}")),
        };
        t.broker.publish("/", m).unwrap().confirmed().await.unwrap();
    }
}

/// Polls `path` until `ready` holds for its JSON (the sampler runs in the
/// background), failing after 20 s.
async fn until(t: &TestServer, path: &str, ready: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..400 {
        let v = t.client.get(path).await.expect(200).json();
        if ready(&v) {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "{path} never got there: {}",
        t.client.get(path).await.json()
    );
}

/// Sum over the history of rate × interval for `key`: the messages counted.
fn counted(history: &Value, key: &str) -> f64 {
    let samples = history["samples"].as_array().unwrap();
    samples
        .windows(2)
        .map(|w| {
            let secs = (w[1]["timestamp"].as_u64().unwrap() - w[0]["timestamp"].as_u64().unwrap())
                as f64
                / 1000.0;
            w[1][key].as_f64().unwrap() * secs
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rates_come_from_the_sampled_counters() {
    let handle = PrometheusBuilder::new().install_recorder().unwrap();
    let source = MetricsSource::new(move || handle.render());
    let config = HttpConfig::default()
        .with_metrics(source)
        .with_rate_interval(Duration::from_millis(100));
    let t = TestServer::start_with(config).await;
    let c = &t.client;
    c.put("/api/queues/%2F/work", json!({})).await.expect(201);
    c.put("/api/exchanges/%2F/in", json!({"type": "fanout"}))
        .await
        .expect(201);
    c.put("/api/exchanges/%2F/nowhere", json!({"type": "fanout"}))
        .await
        .expect(201);
    c.post("/api/bindings/%2F/e/in/q/work", json!({}))
        .await
        .expect(201);

    publish(&t, "in", "", 7).await;
    publish(&t, "nowhere", "", 2).await;

    let q = until(&t, "/api/queues/%2F/work", |q| {
        q["message_stats"]["publish"] == 7
    })
    .await;
    let stats = &q["message_stats"];
    assert_eq!(stats["deliver_get"], 0);
    assert_eq!(stats["ack"], 0);
    assert_eq!(stats["redeliver"], 0);
    for key in ["publish", "deliver_get", "ack", "redeliver"] {
        assert!(
            stats[format!("{key}_details")]["rate"].as_f64().unwrap() >= 0.0,
            "{stats}"
        );
    }

    // Exchanges count what came in, and what went on to a queue.
    let x = until(&t, "/api/exchanges/%2F/nowhere", |x| {
        x["message_stats"]["publish_in"] == 2
    })
    .await;
    assert_eq!(x["message_stats"]["publish_out"], 0, "{x}");
    assert!(x["message_stats"]["publish_out_details"]["rate"].is_number());
    let x = c.get("/api/exchanges/%2F/in").await.expect(200).json();
    assert_eq!(x["message_stats"]["publish_in"], 7, "{x}");
    assert_eq!(x["message_stats"]["publish_out"], 7, "{x}");

    // Deliveries and acks through a get that acks.
    c.post(
        "/api/queues/%2F/work/get",
        json!({"count": 3, "ackmode": "ack_requeue_false"}),
    )
    .await
    .expect(200);
    let o = until(&t, "/api/overview", |o| {
        o["message_stats"]["ack"] == 3 && o["message_stats"]["deliver_get"] == 3
    })
    .await;
    assert_eq!(o["message_stats"]["publish"], 7, "{o}");
    assert!(o["message_stats"]["ack_details"]["rate"].is_number());
    // The recorder's totals keep their own names beside RabbitMQ's.
    assert_eq!(o["message_stats"]["published"], 7.0, "{o}");

    // The history: the rates times their intervals are the counted
    // messages, and the queue's depth follows.
    let h = until(&t, "/api/rates", |h| {
        h["queues"].as_array().unwrap().iter().any(|q| {
            q["name"] == "work" && q["messages"].as_array().unwrap().last() == Some(&json!(4))
        })
    })
    .await;
    assert_eq!(h["interval_ms"], 100);
    assert!(h["samples"].as_array().unwrap().len() <= 120);
    assert_eq!(counted(&h, "publish").round(), 7.0, "{h}");
    assert_eq!(counted(&h, "ack").round(), 3.0, "{h}");
    assert_eq!(counted(&h, "deliver_get").round(), 3.0, "{h}");
    assert_eq!(counted(&h, "redeliver").round(), 0.0, "{h}");
    let first = &h["samples"][0];
    assert!(
        first["publish"].is_null(),
        "the first sample has no rate: {first}"
    );

    // A deleted queue's depths end in nulls, then it leaves the history.
    c.delete("/api/queues/%2F/work").await.expect(204);
    until(&t, "/api/rates", |h| {
        h["queues"].as_array().unwrap().iter().any(|q| {
            q["name"] == "work" && q["messages"].as_array().unwrap().last() == Some(&Value::Null)
        })
    })
    .await;

    // The recorder is the process's, so this part runs after the counts
    // above, which its publishes would otherwise add to.
    without_a_recorder_only_depths_are_sampled().await;
}

async fn without_a_recorder_only_depths_are_sampled() {
    let config = HttpConfig::default().with_rate_interval(Duration::from_millis(50));
    let t = TestServer::start_with(config).await;
    t.client
        .put("/api/queues/%2F/q", json!({}))
        .await
        .expect(201);
    publish(&t, "", "q", 2).await;
    let h = until(&t, "/api/rates", |h| {
        h["samples"]
            .as_array()
            .unwrap()
            .last()
            .map(|s| s["messages"].clone())
            == Some(json!(2))
    })
    .await;
    for s in h["samples"].as_array().unwrap() {
        assert!(s["publish"].is_null() && s["ack"].is_null(), "{s}");
    }
    let q = t.client.get("/api/queues/%2F/q").await.expect(200).json();
    assert!(q.get("message_stats").is_none(), "{q}");
    let o = t.client.get("/api/overview").await.expect(200).json();
    assert!(o["message_stats"].is_null(), "{o}");
}
