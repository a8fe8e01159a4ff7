//! Dead letters over the API: which queues are dead-letter queues, a peek
//! that leaves messages in place with `x-death` and the toolkit's headers
//! decoded, and redrive jobs (rate-limited, in the background) that move
//! messages back to where they died, or stop, leaving the message, when
//! they cannot.

#![allow(clippy::unwrap_used)] // a test helper that fails should panic

mod common;

use std::time::Duration;

use common::TestServer;
use serde_json::{json, Value};

async fn setup(t: &TestServer) {
    let c = &t.client;
    c.put("/api/exchanges/%2F/shop", json!({"type": "direct"}))
        .await
        .expect(201);
    c.put("/api/exchanges/%2F/dlx", json!({"type": "fanout"}))
        .await
        .expect(201);
    c.put(
        "/api/queues/%2F/orders",
        json!({"arguments": {"x-dead-letter-exchange": "dlx"}}),
    )
    .await
    .expect(201);
    c.put("/api/queues/%2F/orders.dead", json!({}))
        .await
        .expect(201);
    c.post(
        "/api/bindings/%2F/e/shop/q/orders",
        json!({"routing_key": "order.placed"}),
    )
    .await
    .expect(201);
    c.post("/api/bindings/%2F/e/dlx/q/orders.dead", json!({}))
        .await
        .expect(201);
    c.put("/api/queues/%2F/billing", json!({}))
        .await
        .expect(201);
    c.put("/api/queues/%2F/billing.dlq", json!({}))
        .await
        .expect(201);
}

async fn publish(t: &TestServer, exchange: &str, key: &str, payload: &str, properties: Value) {
    let r = t
        .client
        .post(
            &format!("/api/exchanges/%2F/{exchange}/publish"),
            json!({"routing_key": key, "payload": payload, "properties": properties}),
        )
        .await
        .expect(200)
        .json();
    assert_eq!(r["routed"], true, "{exchange} {key}");
}

async fn depth(t: &TestServer, queue: &str) -> u64 {
    t.client
        .get(&format!("/api/queues/%2F/{queue}"))
        .await
        .expect(200)
        .json()["messages_ready"]
        .as_u64()
        .unwrap()
}

/// Dead-letters `n` messages from `orders` into `orders.dead`.
async fn kill_orders(t: &TestServer, n: usize) {
    for i in 0..n {
        publish(t, "shop", "order.placed", &format!("order {i}"), json!({})).await;
    }
    t.client
        .post(
            "/api/queues/%2F/orders/get",
            json!({"count": n, "ackmode": "reject_requeue_false"}),
        )
        .await
        .expect(200);
    for _ in 0..100 {
        if depth(t, "orders.dead").await == n as u64 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the rejected orders never reached orders.dead");
}

async fn finished(t: &TestServer, location: &str) -> Value {
    for _ in 0..500 {
        let job = t.client.get(location).await.expect(200).json();
        if job["state"] != "running" {
            return job;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{location} never finished");
}

async fn redrive(t: &TestServer, queue: &str, body: Value) -> (String, Value) {
    let r = t
        .client
        .post(&format!("/api/queues/%2F/{queue}/redrive"), body)
        .await;
    r.expect(202);
    let location = r
        .headers
        .get("location")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    (location, r.json())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlqs_are_listed_with_their_sources_and_depths() {
    let t = TestServer::start().await;
    setup(&t).await;
    kill_orders(&t, 3).await;
    let dlqs = t.client.get("/api/dlq").await.expect(200).json();
    let names: Vec<&str> = dlqs
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["billing.dlq", "orders.dead"]);
    let dead = &dlqs[1];
    assert_eq!(dead["sources"], json!(["orders"]));
    assert_eq!(dead["messages"], 3);
    assert_eq!(dlqs[0]["sources"], json!([]));
    // A direct dead-letter exchange with a key: only the matching binding counts.
    t.client
        .put("/api/exchanges/%2F/dlx2", json!({"type": "direct"}))
        .await
        .expect(201);
    t.client.put("/api/queues/%2F/a", json!({"arguments": {"x-dead-letter-exchange": "dlx2", "x-dead-letter-routing-key": "k"}})).await.expect(201);
    t.client
        .put("/api/queues/%2F/hit", json!({}))
        .await
        .expect(201);
    t.client
        .put("/api/queues/%2F/miss", json!({}))
        .await
        .expect(201);
    t.client
        .post(
            "/api/bindings/%2F/e/dlx2/q/hit",
            json!({"routing_key": "k"}),
        )
        .await
        .expect(201);
    t.client
        .post(
            "/api/bindings/%2F/e/dlx2/q/miss",
            json!({"routing_key": "other"}),
        )
        .await
        .expect(201);
    // And the default exchange with a key names the queue.
    t.client.put("/api/queues/%2F/b", json!({"arguments": {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "parked"}})).await.expect(201);
    t.client
        .put("/api/queues/%2F/parked", json!({}))
        .await
        .expect(201);
    let dlqs = t.client.get("/api/dlq").await.expect(200).json();
    let names: Vec<&str> = dlqs
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["billing.dlq", "hit", "orders.dead", "parked"]);
    t.client.with_auth(None).get("/api/dlq").await.expect(401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peek_leaves_messages_and_decodes_their_deaths() {
    let t = TestServer::start().await;
    setup(&t).await;
    kill_orders(&t, 3).await;
    let first = t
        .client
        .get("/api/queues/%2F/orders.dead/messages?peek=2")
        .await
        .expect(200)
        .json();
    let msgs = first.as_array().unwrap();
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[0]["payload"], "order 0");
    assert_eq!(msgs[1]["payload"], "order 1");
    let death = &msgs[0]["deaths"][0];
    assert_eq!(death["queue"], "orders");
    assert_eq!(death["reason"], "rejected");
    assert_eq!(death["count"], 1);
    assert_eq!(death["exchange"], "shop");
    assert_eq!(death["routing_keys"], json!(["order.placed"]));
    assert!(death["time"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(
        msgs[0]["redrive_target"],
        json!({"exchange": "shop", "routing_key": "order.placed"})
    );
    assert_eq!(msgs[0]["redelivered"], false);
    // Nothing moved: the same messages again, and the depth is unchanged.
    let again = t
        .client
        .get("/api/queues/%2F/orders.dead/messages?peek=2")
        .await
        .expect(200)
        .json();
    assert_eq!(again, first);
    assert_eq!(depth(&t, "orders.dead").await, 3);
    // Default and larger-than-depth counts.
    let all = t
        .client
        .get("/api/queues/%2F/orders.dead/messages")
        .await
        .expect(200)
        .json();
    assert_eq!(all.as_array().unwrap().len(), 3);
    // A returned message is peeked first, marked redelivered.
    t.client
        .post(
            "/api/queues/%2F/orders.dead/get",
            json!({"count": 1, "ackmode": "ack_requeue_true"}),
        )
        .await
        .expect(200);
    let after = t
        .client
        .get("/api/queues/%2F/orders.dead/messages?peek=1")
        .await
        .expect(200)
        .json();
    assert_eq!(after[0]["payload"], "order 0");
    assert_eq!(after[0]["redelivered"], true);
    // The toolkit's headers.
    publish(
        &t,
        "amq.default",
        "billing.dlq",
        "invoice",
        json!({"headers": {
        "tern-failed-service": "billing", "tern-error": "card declined", "tern-attempt": 5}}),
    )
    .await;
    let tk = t
        .client
        .get("/api/queues/%2F/billing.dlq/messages?peek=1")
        .await
        .expect(200)
        .json();
    assert_eq!(tk[0]["error"], "card declined");
    assert_eq!(tk[0]["failed_service"], "billing");
    assert_eq!(tk[0]["deaths"], json!([]));
    assert_eq!(
        tk[0]["redrive_target"],
        json!({"exchange": "", "routing_key": "billing"})
    );
    // Errors.
    for bad in ["0", "1001", "x", "-1"] {
        let r = t
            .client
            .get(&format!("/api/queues/%2F/orders.dead/messages?peek={bad}"))
            .await;
        r.expect(400);
    }
    t.client
        .get("/api/queues/%2F/nope/messages")
        .await
        .expect(404);
    t.client
        .get("/api/queues/nope/orders/messages")
        .await
        .expect(404);
    t.client
        .with_auth(None)
        .get("/api/queues/%2F/orders.dead/messages")
        .await
        .expect(401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_moves_messages_back_rate_limited_with_progress() {
    let t = TestServer::start().await;
    setup(&t).await;
    kill_orders(&t, 3).await;
    // Validation first: nothing moves.
    for body in [
        json!({}),
        json!({"rate_per_second": 0}),
        json!({"rate_per_second": -1}),
        json!({"rate_per_second": 20000}),
        json!({"rate_per_second": 5, "limit": 0}),
        json!({"rate_per_second": 5e-324}),
        json!({"rate_per_second": 5, "surprise": true}),
    ] {
        let r = t
            .client
            .post("/api/queues/%2F/orders.dead/redrive", body.clone())
            .await;
        assert_eq!(r.status.as_u16(), 400, "{body}: {:?}", r.body);
        assert_eq!(r.error(), "bad_request");
    }
    t.client
        .post(
            "/api/queues/%2F/nope/redrive",
            json!({"rate_per_second": 5}),
        )
        .await
        .expect(404);
    t.client
        .post(
            "/api/queues/%2F/orders.dead/redrive",
            json!({"rate_per_second": 5, "to_exchange": "nope"}),
        )
        .await
        .expect(404);
    t.client
        .with_auth(None)
        .post(
            "/api/queues/%2F/orders.dead/redrive",
            json!({"rate_per_second": 5}),
        )
        .await
        .expect(401);
    assert_eq!(depth(&t, "orders.dead").await, 3);

    // Two of three, at 4 a second: the job is still running right after it
    // starts (the second message waits a quarter of a second).
    let (location, started) =
        redrive(&t, "orders.dead", json!({"rate_per_second": 4, "limit": 2})).await;
    assert_eq!(started["state"], "running");
    assert!(started["moved"].as_u64().unwrap() <= 1);
    let done = finished(&t, &location).await;
    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!(done["moved"], 2);
    assert_eq!(done["remaining"], 0);
    assert_eq!(done["total"], 2);
    assert_eq!(depth(&t, "orders.dead").await, 1);
    assert_eq!(depth(&t, "orders").await, 2);
    // Back through the original exchange and key, x-death kept.
    let back = t
        .client
        .get("/api/queues/%2F/orders/messages?peek=2")
        .await
        .expect(200)
        .json();
    assert_eq!(back[0]["payload"], "order 0");
    assert_eq!(back[0]["routing_key"], "order.placed");
    assert_eq!(back[0]["deaths"][0]["queue"], "orders");
    // The rest, with no limit: as many as were there.
    let (location, _) = redrive(&t, "orders.dead", json!({"rate_per_second": 1000})).await;
    let done = finished(&t, &location).await;
    assert_eq!(done["moved"], 1, "{done}");
    assert_eq!(depth(&t, "orders.dead").await, 0);
    assert_eq!(depth(&t, "orders").await, 3);
    // Every job is listed.
    let jobs = t.client.get("/api/redrives").await.expect(200).json();
    assert_eq!(jobs.as_array().unwrap().len(), 2);
    t.client.get("/api/redrives/999").await.expect(404);
    t.client.get("/api/redrives/abc").await.expect(400);
    t.client
        .get("/api/redrives/121489129045679325184")
        .await
        .expect(404);

    // A toolkit dead letter goes to its service's queue, with fresh attempts.
    publish(&t, "amq.default", "billing.dlq", "invoice", json!({"headers": {
        "tern-failed-service": "billing", "tern-error": "card declined", "tern-attempt": 5, "keep": "me"}})).await;
    let (location, _) = redrive(&t, "billing.dlq", json!({"rate_per_second": 100})).await;
    assert_eq!(finished(&t, &location).await["moved"], 1);
    let got = t
        .client
        .get("/api/queues/%2F/billing/messages?peek=1")
        .await
        .expect(200)
        .json();
    assert_eq!(got[0]["payload"], "invoice");
    assert_eq!(got[0]["properties"]["headers"], json!({"keep": "me"}));

    // to_exchange and routing_key override the message's own target.
    kill_orders(&t, 1).await;
    let (location, _) = redrive(
        &t,
        "orders.dead",
        json!({"rate_per_second": 100, "to_exchange": "amq.default", "routing_key": "billing"}),
    )
    .await;
    assert_eq!(finished(&t, &location).await["moved"], 1);
    assert_eq!(depth(&t, "billing").await, 2);

    // routing_key alone: the message's own exchange with another key.
    kill_orders(&t, 1).await;
    t.client
        .post(
            "/api/bindings/%2F/e/shop/q/billing",
            json!({"routing_key": "order.retry"}),
        )
        .await
        .expect(201);
    let (location, _) = redrive(
        &t,
        "orders.dead",
        json!({"rate_per_second": 100, "routing_key": "order.retry"}),
    )
    .await;
    assert_eq!(finished(&t, &location).await["moved"], 1);
    assert_eq!(depth(&t, "billing").await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_cannot_move_stays_and_fails_the_job() {
    let t = TestServer::start().await;
    setup(&t).await;
    // No x-death and no toolkit header: nowhere to go.
    publish(&t, "amq.default", "orders.dead", "orphan", json!({})).await;
    let (location, _) = redrive(&t, "orders.dead", json!({"rate_per_second": 100})).await;
    let done = finished(&t, &location).await;
    assert_eq!(done["state"], "failed");
    assert!(
        done["reason"].as_str().unwrap().contains("x-death"),
        "{done}"
    );
    assert_eq!(done["moved"], 0);
    assert_eq!(depth(&t, "orders.dead").await, 1);
    // A target that routes nowhere: the message stays too.
    t.client
        .put("/api/exchanges/%2F/void", json!({"type": "direct"}))
        .await
        .expect(201);
    let (location, _) = redrive(
        &t,
        "orders.dead",
        json!({"rate_per_second": 100, "to_exchange": "void"}),
    )
    .await;
    let done = finished(&t, &location).await;
    assert_eq!(done["state"], "failed");
    assert!(
        done["reason"].as_str().unwrap().contains("to no queue"),
        "{done}"
    );
    assert_eq!(depth(&t, "orders.dead").await, 1);
    let q = t
        .client
        .get("/api/queues/%2F/orders.dead")
        .await
        .expect(200)
        .json();
    assert_eq!(q["messages_unacknowledged"], 0);
}
