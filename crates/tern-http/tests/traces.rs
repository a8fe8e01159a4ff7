//! Message tracing over the API: off by default; once on, a flow's
//! messages (by correlation id) come back in publish order with their
//! envelopes, causation and the queues they reached, and their deliveries
//! and settlements; messages without a correlation id are not kept; the
//! index is bounded (oldest out first); off again, nothing is kept.

#![allow(clippy::unwrap_used)] // a test helper that fails should panic

mod common;

use common::TestServer;
use serde_json::{json, Value};

async fn publish(t: &TestServer, queue: &str, properties: Value) {
    t.client
        .post(
            "/api/exchanges/%2F/amq.default/publish",
            json!({"routing_key": queue, "payload": "x", "properties": properties}),
        )
        .await
        .expect(200);
}

async fn get(t: &TestServer, queue: &str, ackmode: &str) {
    let got = t
        .client
        .post(
            &format!("/api/queues/%2F/{queue}/get"),
            json!({"count": 1, "ackmode": ackmode}),
        )
        .await
        .expect(200)
        .json();
    assert_eq!(got.as_array().unwrap().len(), 1);
}

fn kinds(message: &Value) -> Vec<&str> {
    message["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_are_traced_by_correlation_id_when_tracing_is_on() {
    let t = TestServer::start().await;
    for q in ["billing", "mail"] {
        t.client
            .put(&format!("/api/queues/%2F/{q}"), json!({}))
            .await
            .expect(201);
    }
    // Off by default.
    let settings = t.client.get("/api/trace-settings").await.expect(200).json();
    assert_eq!(settings["enabled"], false);
    publish(&t, "billing", json!({"correlation_id": "early"})).await;
    let off = t.client.get("/api/traces/early").await;
    off.expect(404);
    assert!(off.json()["reason"]
        .as_str()
        .unwrap()
        .contains("tracing is off"));

    // Bad settings change nothing.
    for body in [
        json!({}),
        json!({"enabled": true, "capacity": 0}),
        json!({"enabled": true, "capacity": 2_000_000}),
        json!({"enabled": true, "sample_one_in": 0}),
        json!({"enabled": true, "surprise": 1}),
        json!({"enabled": false, "sample_one_in": 0}),
    ] {
        t.client.put("/api/trace-settings", body).await.expect(400);
    }
    t.client
        .with_auth(None)
        .put("/api/trace-settings", json!({"enabled": true}))
        .await
        .expect(401);
    t.client
        .with_auth(None)
        .get("/api/traces/x")
        .await
        .expect(401);
    assert_eq!(
        t.client.get("/api/trace-settings").await.expect(200).json()["enabled"],
        false
    );

    let on = t
        .client
        .put(
            "/api/trace-settings",
            json!({"enabled": true, "capacity": 3}),
        )
        .await
        .expect(200)
        .json();
    assert_eq!(
        on,
        json!({"enabled": true, "capacity": 3, "sample_one_in": 1})
    );

    // An order placed by the shop, handled by billing, which sends a mail
    // that is returned once.
    publish(
        &t,
        "billing",
        json!({"correlation_id": "flow-1", "message_id": "m1",
        "type": "OrderPlaced", "app_id": "shop"}),
    )
    .await;
    publish(&t, "billing", json!({"message_id": "loner"})).await; // no correlation id
                                                                  // The untraced earlier message is ahead of m1 in the queue.
    get(&t, "billing", "ack_requeue_false").await;
    get(&t, "billing", "ack_requeue_false").await;
    publish(
        &t,
        "mail",
        json!({"correlation_id": "flow-1", "message_id": "m2",
        "type": "InvoiceSent", "app_id": "billing",
        "headers": {"cloudEvents_causationid": "m1"}}),
    )
    .await;
    get(&t, "mail", "ack_requeue_true").await;
    publish(
        &t,
        "mail",
        json!({"correlation_id": "flow-2", "message_id": "other"}),
    )
    .await;

    let flow = t.client.get("/api/traces/flow-1").await.expect(200).json();
    let messages = flow["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2, "{flow}");
    let m1 = &messages[0];
    assert_eq!(m1["message_id"], "m1");
    assert_eq!(m1["type"], "OrderPlaced");
    assert_eq!(m1["app_id"], "shop");
    assert_eq!(m1["exchange"], "");
    assert_eq!(m1["queues"], json!(["billing"]));
    assert_eq!(m1["causation_id"], Value::Null);
    assert_eq!(kinds(m1), ["delivered", "acked"]);
    let m2 = &messages[1];
    assert_eq!(m2["causation_id"], "m1");
    assert_eq!(m2["queues"], json!(["mail"]));
    assert_eq!(kinds(m2), ["delivered", "requeued"]);
    assert!(m2["published_at"].as_u64() >= m1["published_at"].as_u64());
    assert!(m1["events"][0]["at"].as_u64() >= m1["published_at"].as_u64());
    t.client.get("/api/traces/early").await.expect(404);
    t.client.get("/api/traces/flow-2").await.expect(200);

    // Bounded at 3: two more of flow-2 push flow-1's oldest out.
    for i in 0..2 {
        publish(
            &t,
            "mail",
            json!({"correlation_id": "flow-2", "message_id": format!("x{i}")}),
        )
        .await;
    }
    let flow = t.client.get("/api/traces/flow-1").await;
    flow.expect(404);
    let flow2 = t.client.get("/api/traces/flow-2").await.expect(200).json();
    assert_eq!(flow2["messages"].as_array().unwrap().len(), 3);

    // Off again: nothing is kept.
    t.client
        .put("/api/trace-settings", json!({"enabled": false}))
        .await
        .expect(200);
    let r = t.client.get("/api/traces/flow-2").await;
    r.expect(404);
    assert!(r.json()["reason"]
        .as_str()
        .unwrap()
        .contains("tracing is off"));
}
