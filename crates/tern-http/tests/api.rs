//! The management API over a real socket: every endpoint's success, and
//! its 400 (validation), 401 (credentials), 403 (refused), 404 (not
//! found) and 409 (conflict) answers, each as a JSON `{error, reason}`.

#![allow(clippy::unwrap_used)] // a test helper that fails should panic

mod common;

use bytes::Bytes;
use common::TestServer;
use serde_json::{json, Value};
use tern_broker::UserTag;
use tern_broker::{ExchangeName, Message, Properties, QueueDeclare};
use tern_http::HttpConfig;

async fn publish(t: &TestServer, queue: &str, body: &str) {
    let m = Message {
        exchange: ExchangeName::default_exchange(),
        routing_key: queue.into(),
        properties: Properties::default(),
        body: Bytes::copy_from_slice(body.as_bytes()),
    };
    t.broker.publish("/", m).unwrap().confirmed().await.unwrap();
}

fn names(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_valid_credentials_get_401() {
    let t = TestServer::start().await;
    let anon = t.client.with_auth(None);
    let r = anon.get("/api/overview").await;
    r.expect(401);
    assert_eq!(r.error(), "not_authorized");
    assert!(r.json()["reason"]
        .as_str()
        .unwrap()
        .contains("authentication required"));
    assert_eq!(
        r.headers.get("www-authenticate").unwrap(),
        "Basic realm=\"tern\""
    );
    // guest:wrong
    let wrong = t.client.with_auth(Some("Basic Z3Vlc3Q6d3Jvbmc="));
    wrong.get("/api/queues").await.expect(401);
    let malformed = t.client.with_auth(Some("Basic ###"));
    assert!(malformed.get("/api/queues").await.json()["reason"]
        .as_str()
        .unwrap()
        .contains("malformed"));
    // No token is configured, so no token works.
    let bearer = t.client.with_auth(Some("Bearer anything"));
    bearer.get("/api/queues").await.expect(401);
    // Mutations are refused before they happen.
    anon.put("/api/queues/%2F/sneaky", json!({}))
        .await
        .expect(401);
    assert!(t.broker.queue_info("/", "sneaky").is_err());
    // The OpenAPI document and the metrics are open.
    anon.get("/api/openapi.json").await.expect(200);
    anon.get("/metrics").await.expect(200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_users_and_bearer_tokens_are_accepted() {
    let t = TestServer::start_with(HttpConfig::default().with_bearer_token("t0ken")).await;
    t.broker
        .put_user("ops", Some("s3cret"), vec![UserTag::Monitoring])
        .await
        .unwrap();
    // ops:s3cret
    let ops = t.client.with_auth(Some("Basic b3BzOnMzY3JldA=="));
    ops.get("/api/overview").await.expect(200);
    let me = ops.get("/api/whoami").await.expect(200).json();
    assert_eq!(me, json!({"name": "ops", "tags": ["monitoring"]}));
    let token = t.client.with_auth(Some("Bearer t0ken"));
    token.get("/api/overview").await.expect(200);
    let me = token.get("/api/whoami").await.expect(200).json();
    assert_eq!(me, json!({"name": "token", "tags": ["administrator"]}));
    t.client
        .with_auth(Some("Bearer t0ken2"))
        .get("/api/overview")
        .await
        .expect(401);
    // ops:wrong
    t.client
        .with_auth(Some("Basic b3BzOndyb25n"))
        .get("/api/overview")
        .await
        .expect(401);
    // A user without tags may not use the API (RabbitMQ's "Not management user").
    t.broker.put_user("app", Some("pw"), vec![]).await.unwrap();
    // app:pw
    let r = t
        .client
        .with_auth(Some("Basic YXBwOnB3"))
        .get("/api/overview")
        .await;
    r.expect(401);
    assert!(r.json()["reason"]
        .as_str()
        .unwrap()
        .contains("no management tag"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_and_methods_answer_json() {
    let t = TestServer::start().await;
    let r = t.client.get("/api/nothing-here").await;
    r.expect(404);
    assert_eq!(r.error(), "not_found");
    let r = t.client.raw("PATCH", "/api/queues/%2F/q", None).await;
    r.expect(405);
    assert_eq!(r.error(), "method_not_allowed");
    assert!(r.headers.get("allow").is_some());
    let r = t.client.post("/api/overview", json!({})).await;
    r.expect(405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overview_counts_objects_and_messages() {
    let t = TestServer::start().await;
    t.client
        .put("/api/queues/%2F/work", json!({}))
        .await
        .expect(201);
    publish(&t, "work", "a").await;
    publish(&t, "work", "b").await;
    let v = t.client.get("/api/overview").await.expect(200).json();
    assert_eq!(v["tern_version"], env!("CARGO_PKG_VERSION"));
    assert!(v["uptime_ms"].is_u64());
    assert_eq!(v["object_totals"]["queues"], 1);
    assert_eq!(v["object_totals"]["vhosts"], 1);
    assert_eq!(v["object_totals"]["exchanges"], 6);
    assert_eq!(v["queue_totals"]["messages_ready"], 2);
    assert_eq!(v["queue_totals"]["messages_unacknowledged"], 0);
    assert!(v["journal"]["records"].as_u64().unwrap() >= 2);
    // No metrics recorder in this test: no counters to show.
    assert!(v["message_stats"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vhosts_are_created_listed_and_deleted() {
    let t = TestServer::start().await;
    assert_eq!(
        names(&t.client.get("/api/vhosts").await.expect(200).json()),
        ["/"]
    );
    t.client.get("/api/vhosts/%2F").await.expect(200);
    t.client
        .put("/api/vhosts/a%2Fb", json!({}))
        .await
        .expect(201);
    t.client
        .put("/api/vhosts/a%2Fb", json!({}))
        .await
        .expect(204);
    assert_eq!(
        names(&t.client.get("/api/vhosts").await.json()),
        ["/", "a/b"]
    );
    // Things in it are addressed with the encoded name.
    t.client
        .put("/api/queues/a%2Fb/inner", json!({}))
        .await
        .expect(201);
    assert_eq!(
        t.client
            .get("/api/queues/a%2Fb/inner")
            .await
            .expect(200)
            .json()["vhost"],
        "a/b"
    );
    t.client.delete("/api/vhosts/a%2Fb").await.expect(204);
    let r = t.client.get("/api/vhosts/a%2Fb").await;
    r.expect(404);
    assert_eq!(r.error(), "not_found");
    t.client.delete("/api/vhosts/a%2Fb").await.expect(404);
    t.client.get("/api/queues/a%2Fb/inner").await.expect(404);
    // A name longer than 255 bytes is invalid.
    let long = "v".repeat(256);
    let r = t
        .client
        .put(&format!("/api/vhosts/{long}"), json!({}))
        .await;
    r.expect(400);
    assert_eq!(r.error(), "invalid_name");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchanges_are_declared_inspected_and_deleted() {
    let t = TestServer::start().await;
    let c = &t.client;
    let decl = json!({"type": "topic", "durable": false, "arguments": {"alternate-exchange": "amq.fanout"}});
    c.put("/api/exchanges/%2F/orders", decl.clone())
        .await
        .expect(201);
    c.put("/api/exchanges/%2F/orders", decl).await.expect(204);
    let v = c.get("/api/exchanges/%2F/orders").await.expect(200).json();
    assert_eq!(v["type"], "topic");
    assert_eq!(v["durable"], false);
    assert_eq!(v["arguments"]["alternate-exchange"], "amq.fanout");
    // The default exchange goes by amq.default in paths.
    let d = c
        .get("/api/exchanges/%2F/amq.default")
        .await
        .expect(200)
        .json();
    assert_eq!(d["name"], "");
    assert_eq!(d["type"], "direct");

    let all = c.get("/api/exchanges").await.expect(200).json();
    assert!(names(&all).contains(&"orders".to_string()));
    let in_vhost = c
        .get("/api/exchanges/%2F?name=ord")
        .await
        .expect(200)
        .json();
    assert_eq!(names(&in_vhost), ["orders"]);

    // 409: the same name with other properties.
    let r = c
        .put(
            "/api/exchanges/%2F/orders",
            json!({"type": "direct", "durable": false}),
        )
        .await;
    r.expect(409);
    assert_eq!(r.error(), "inequivalent_arg");
    // The plugin types: the type shown is the one declared.
    c.put(
        "/api/exchanges/%2F/later",
        json!({"type": "x-delayed-message", "arguments": {"x-delayed-type": "topic"}}),
    )
    .await
    .expect(201);
    let v = c.get("/api/exchanges/%2F/later").await.expect(200).json();
    assert_eq!(v["type"], "x-delayed-message");
    c.put(
        "/api/exchanges/%2F/once",
        json!({"type": "x-message-deduplication", "arguments": {"x-cache-size": 100}}),
    )
    .await
    .expect(201);
    let v = c.get("/api/exchanges/%2F/once").await.expect(200).json();
    assert_eq!(v["type"], "x-message-deduplication");
    let r = c
        .put(
            "/api/exchanges/%2F/later2",
            json!({"type": "x-delayed-message"}),
        )
        .await;
    r.expect(400);
    assert!(r.json()["reason"]
        .as_str()
        .unwrap()
        .contains("x-delayed-type"));
    // 400: no type, an unknown type, a body that is not JSON, arguments not an object.
    let r = c.put("/api/exchanges/%2F/x1", json!({})).await;
    r.expect(400);
    assert!(r.json()["reason"].as_str().unwrap().contains("type"));
    c.put("/api/exchanges/%2F/x1", json!({"type": "sideways"}))
        .await
        .expect(400);
    c.raw("PUT", "/api/exchanges/%2F/x1", Some(b"{not json"))
        .await
        .expect(400);
    c.put(
        "/api/exchanges/%2F/x1",
        json!({"type": "direct", "arguments": [1]}),
    )
    .await
    .expect(400);
    c.put(
        "/api/exchanges/%2F/x1",
        json!({"type": "direct", "durable": "yes"}),
    )
    .await
    .expect(400);
    // 403: reserved names.
    let r = c
        .put("/api/exchanges/%2F/amq.mine", json!({"type": "direct"}))
        .await;
    r.expect(403);
    assert_eq!(r.error(), "access_refused");
    c.delete("/api/exchanges/%2F/amq.direct").await.expect(403);
    // 404: no such vhost or exchange.
    c.put("/api/exchanges/nowhere/x", json!({"type": "direct"}))
        .await
        .expect(404);
    c.get("/api/exchanges/nowhere").await.expect(404);
    c.get("/api/exchanges/%2F/missing").await.expect(404);
    c.delete("/api/exchanges/%2F/missing").await.expect(404);

    // 409: if-unused while bound; then deleted.
    c.put("/api/queues/%2F/q", json!({})).await.expect(201);
    c.post(
        "/api/bindings/%2F/e/orders/q/q",
        json!({"routing_key": "#"}),
    )
    .await
    .expect(201);
    let r = c.delete("/api/exchanges/%2F/orders?if-unused=true").await;
    r.expect(409);
    assert_eq!(r.error(), "precondition_failed");
    c.delete("/api/exchanges/%2F/orders?if-unused=maybe")
        .await
        .expect(400);
    c.delete("/api/exchanges/%2F/orders").await.expect(204);
    c.get("/api/exchanges/%2F/orders").await.expect(404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_are_declared_inspected_purged_and_deleted() {
    let t = TestServer::start().await;
    let c = &t.client;
    let decl =
        json!({"durable": true, "arguments": {"x-max-length": 10, "x-queue-type": "classic"}});
    c.put("/api/queues/%2F/work", decl.clone())
        .await
        .expect(201);
    c.put("/api/queues/%2F/work", decl).await.expect(204);
    publish(&t, "work", "a").await;
    publish(&t, "work", "b").await;
    let v = c.get("/api/queues/%2F/work").await.expect(200).json();
    assert_eq!(v["name"], "work");
    assert_eq!(v["vhost"], "/");
    assert_eq!(v["durable"], true);
    assert_eq!(v["type"], "classic");
    assert_eq!(v["arguments"]["x-max-length"], 10);
    assert_eq!(v["messages_ready"], 2);
    assert_eq!(v["messages"], 2);
    assert_eq!(v["consumers"], 0);

    // 409: other properties; 400: bad arguments, exclusive, bad JSON, bad name.
    let r = c
        .put("/api/queues/%2F/work", json!({"durable": false}))
        .await;
    r.expect(409);
    assert_eq!(r.error(), "inequivalent_arg");
    let r = c
        .put(
            "/api/queues/%2F/bad",
            json!({"arguments": {"x-max-length": "ten"}}),
        )
        .await;
    r.expect(400);
    assert_eq!(r.error(), "invalid_argument");
    // A stream refuses the queue-only arguments.
    c.put(
        "/api/queues/%2F/bad",
        json!({"arguments": {"x-queue-type": "stream", "x-max-length": 5}}),
    )
    .await
    .expect(400);
    c.put("/api/queues/%2F/bad", json!({"exclusive": true}))
        .await
        .expect(400);
    c.raw("PUT", "/api/queues/%2F/bad", Some(b"[]"))
        .await
        .expect(400);
    c.put(&format!("/api/queues/%2F/{}", "q".repeat(256)), json!({}))
        .await
        .expect(400);
    assert!(t.broker.queue_info("/", "bad").is_err());
    // 403: reserved prefix; 404: vhost or queue missing.
    c.put("/api/queues/%2F/amq.q", json!({})).await.expect(403);
    c.put("/api/queues/nowhere/q", json!({})).await.expect(404);
    c.get("/api/queues/%2F/missing").await.expect(404);
    c.delete("/api/queues/%2F/missing").await.expect(404);
    c.delete("/api/queues/%2F/missing/contents")
        .await
        .expect(404);

    // 409: if-empty with messages; purge; then if-empty passes.
    let r = c.delete("/api/queues/%2F/work?if-empty=true").await;
    r.expect(409);
    c.delete("/api/queues/%2F/work/contents").await.expect(204);
    assert_eq!(
        c.get("/api/queues/%2F/work").await.json()["messages_ready"],
        0
    );
    c.delete("/api/queues/%2F/work?if-empty=true&if-unused=true")
        .await
        .expect(204);
    c.get("/api/queues/%2F/work").await.expect(404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_lists_are_filtered_and_paginated() {
    let t = TestServer::start().await;
    for i in 0..12 {
        t.client
            .put(&format!("/api/queues/%2F/q{i:02}"), json!({}))
            .await
            .expect(201);
    }
    t.client
        .put("/api/queues/%2F/other", json!({}))
        .await
        .expect(201);
    let all = t.client.get("/api/queues").await.expect(200).json();
    assert_eq!(all.as_array().unwrap().len(), 13);
    let per_vhost = t.client.get("/api/queues/%2F").await.expect(200).json();
    assert_eq!(per_vhost, all);

    let mut seen = Vec::new();
    for page in 1..=3 {
        let v = t
            .client
            .get(&format!("/api/queues?name=q&page={page}&page_size=5"))
            .await
            .expect(200)
            .json();
        assert_eq!(v["page"], page);
        assert_eq!(v["page_count"], 3);
        assert_eq!(v["filtered_count"], 12);
        assert_eq!(v["total_count"], 13);
        seen.extend(names(&v["items"]));
    }
    let expected: Vec<String> = (0..12).map(|i| format!("q{i:02}")).collect();
    assert_eq!(seen, expected);

    let past = t
        .client
        .get("/api/queues?page=9&page_size=5")
        .await
        .expect(200)
        .json();
    assert_eq!(past["items"], json!([]));
    assert_eq!(past["page_count"], 3);
    for bad in [
        "/api/queues?page=0",
        "/api/queues?page=x",
        "/api/queues?page=1&page_size=0",
        "/api/queues?page=1&page_size=501",
    ] {
        let r = t.client.get(bad).await;
        r.expect(400);
        assert_eq!(r.error(), "bad_request", "{bad}");
    }
    t.client.get("/api/queues/nowhere").await.expect(404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_connections_exclusive_queue_is_locked() {
    let t = TestServer::start().await;
    let owner = t.broker.new_connection_id();
    let mut decl = QueueDeclare::new("mine");
    decl.exclusive = true;
    decl.durable = false;
    t.broker.declare_queue("/", decl, owner).await.unwrap();
    // Visible, but neither purged nor deleted through the API.
    let v = t
        .client
        .get("/api/queues/%2F/mine")
        .await
        .expect(200)
        .json();
    assert_eq!(v["exclusive"], true);
    let r = t.client.delete("/api/queues/%2F/mine").await;
    r.expect(409);
    assert_eq!(r.error(), "resource_locked");
    t.client
        .delete("/api/queues/%2F/mine/contents")
        .await
        .expect(409);
    t.client
        .post(
            "/api/queues/%2F/mine/get",
            json!({"count": 1, "ackmode": "ack_requeue_false"}),
        )
        .await
        .expect(409);
    assert!(t.broker.queue_info("/", "mine").is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bindings_are_created_listed_and_removed() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.put("/api/exchanges/%2F/events", json!({"type": "topic"}))
        .await
        .expect(201);
    c.put("/api/exchanges/%2F/more", json!({"type": "fanout"}))
        .await
        .expect(201);
    c.put("/api/queues/%2F/audit", json!({})).await.expect(201);

    let r = c
        .post(
            "/api/bindings/%2F/e/events/q/audit",
            json!({"routing_key": "order.*"}),
        )
        .await;
    r.expect(201);
    assert_eq!(r.headers.get("location").unwrap(), "order.*");
    let r = c
        .post(
            "/api/bindings/%2F/e/events/q/audit",
            json!({"routing_key": "x", "arguments": {"k": 1}}),
        )
        .await;
    r.expect(201);
    let with_args = r
        .headers
        .get("location")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert!(with_args.starts_with("x~"), "{with_args}");
    c.post("/api/bindings/%2F/e/events/e/more", json!({}))
        .await
        .expect(201);

    let list = c
        .get("/api/bindings/%2F/e/events/q/audit")
        .await
        .expect(200)
        .json();
    let keys: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["properties_key"].as_str().unwrap())
        .collect();
    assert_eq!(keys.len(), 2);
    assert!(keys.contains(&"order.*") && keys.contains(&with_args.as_str()));
    let one = c
        .get("/api/bindings/%2F/e/events/q/audit/order.*")
        .await
        .expect(200)
        .json();
    assert_eq!(one["destination_type"], "queue");
    assert_eq!(one["source"], "events");
    let e2e = c
        .get("/api/bindings/%2F/e/events/e/more")
        .await
        .expect(200)
        .json();
    assert_eq!(e2e[0]["properties_key"], "~");
    assert_eq!(e2e[0]["destination_type"], "exchange");
    c.get("/api/bindings/%2F/e/events/e/more/~")
        .await
        .expect(200);
    assert_eq!(
        c.get("/api/bindings/%2F")
            .await
            .expect(200)
            .json()
            .as_array()
            .unwrap()
            .len(),
        3
    );
    assert_eq!(
        c.get("/api/bindings")
            .await
            .expect(200)
            .json()
            .as_array()
            .unwrap()
            .len(),
        3
    );

    // Per queue and per exchange.
    let of_queue = c
        .get("/api/queues/%2F/audit/bindings")
        .await
        .expect(200)
        .json();
    assert_eq!(of_queue.as_array().unwrap().len(), 2);
    assert!(of_queue
        .as_array()
        .unwrap()
        .iter()
        .all(|b| b["destination"] == "audit"));
    let source = c
        .get("/api/exchanges/%2F/events/bindings/source")
        .await
        .expect(200)
        .json();
    assert_eq!(source.as_array().unwrap().len(), 3);
    let destination = c
        .get("/api/exchanges/%2F/more/bindings/destination")
        .await
        .expect(200)
        .json();
    assert_eq!(destination.as_array().unwrap().len(), 1);
    assert_eq!(destination[0]["source"], "events");
    assert_eq!(
        c.get("/api/exchanges/%2F/more/bindings/source")
            .await
            .expect(200)
            .json(),
        json!([])
    );
    c.get("/api/queues/%2F/missing/bindings").await.expect(404);
    c.get("/api/exchanges/%2F/missing/bindings/source")
        .await
        .expect(404);
    c.get("/api/exchanges/nowhere/more/bindings/destination")
        .await
        .expect(404);

    // Publishing through the binding reaches the queue.
    let r = c
        .post(
            "/api/exchanges/%2F/events/publish",
            json!({"routing_key": "order.created", "payload": "p"}),
        )
        .await
        .expect(200)
        .json();
    assert_eq!(r["routed"], true);

    // 400, 403, 404.
    c.raw("POST", "/api/bindings/%2F/e/events/q/audit", Some(b"nope"))
        .await
        .expect(400);
    c.post(
        "/api/bindings/%2F/e/events/q/audit",
        json!({"routing_key": 5}),
    )
    .await
    .expect(400);
    c.post("/api/bindings/%2F/e/amq.default/q/audit", json!({}))
        .await
        .expect(403);
    c.post("/api/bindings/%2F/e/events/q/missing", json!({}))
        .await
        .expect(404);
    c.post("/api/bindings/%2F/e/missing/q/audit", json!({}))
        .await
        .expect(404);
    c.get("/api/bindings/%2F/e/missing/q/audit")
        .await
        .expect(404);
    c.get("/api/bindings/%2F/e/events/q/audit/nope")
        .await
        .expect(404);
    c.get("/api/bindings/nowhere").await.expect(404);

    // Removal, one binding at a time.
    c.delete("/api/bindings/%2F/e/events/q/audit/order.*")
        .await
        .expect(204);
    c.delete("/api/bindings/%2F/e/events/q/audit/order.*")
        .await
        .expect(404);
    c.delete(&format!("/api/bindings/%2F/e/events/q/audit/{with_args}"))
        .await
        .expect(204);
    c.delete("/api/bindings/%2F/e/events/e/more/~")
        .await
        .expect(204);
    assert!(c
        .get("/api/bindings/%2F")
        .await
        .json()
        .as_array()
        .unwrap()
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_routes_and_validates() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.put("/api/queues/%2F/inbox", json!({})).await.expect(201);
    let r = c
        .post(
            "/api/exchanges/%2F/amq.default/publish",
            json!({
                "routing_key": "inbox",
                "payload": "aGVsbG8=",
                "payload_encoding": "base64",
                "properties": {"correlation_id": "c-1", "delivery_mode": 2, "headers": {"n": 7}},
            }),
        )
        .await
        .expect(200)
        .json();
    assert_eq!(r, json!({"routed": true, "rejected": false}));
    let mut ch = t
        .broker
        .open_channel("/", t.broker.new_connection_id())
        .unwrap();
    let got = ch.get("inbox", true).unwrap().unwrap();
    assert_eq!(&got.message.body[..], b"hello");
    assert_eq!(
        got.message.properties.correlation_id.as_deref(),
        Some("c-1")
    );
    assert_eq!(got.message.properties.delivery_mode, Some(2));

    let r = c
        .post(
            "/api/exchanges/%2F/amq.direct/publish",
            json!({"routing_key": "nowhere", "payload": "x"}),
        )
        .await
        .expect(200)
        .json();
    assert_eq!(r["routed"], false);

    for bad in [
        json!({"payload": "x"}),
        json!({"routing_key": "inbox"}),
        json!({"routing_key": "inbox", "payload": "***", "payload_encoding": "base64"}),
        json!({"routing_key": "inbox", "payload": "x", "payload_encoding": "rot13"}),
        json!({"routing_key": "inbox", "payload": "x", "properties": {"delivery_mode": 3}}),
        json!({"routing_key": "inbox", "payload": "x", "properties": {"priority": 300}}),
        json!({"routing_key": "inbox", "payload": "x", "properties": {"expiration": "soon"}}),
        json!({"routing_key": "inbox", "payload": "x", "properties": {"headers": "h"}}),
    ] {
        let r = c
            .post("/api/exchanges/%2F/amq.default/publish", bad.clone())
            .await;
        assert_eq!(r.status.as_u16(), 400, "{bad}: {:?}", r.body);
    }
    c.post(
        "/api/exchanges/%2F/missing/publish",
        json!({"routing_key": "k", "payload": "x"}),
    )
    .await
    .expect(404);
    c.put(
        "/api/exchanges/%2F/inside",
        json!({"type": "fanout", "internal": true}),
    )
    .await
    .expect(201);
    c.post(
        "/api/exchanges/%2F/inside/publish",
        json!({"routing_key": "k", "payload": "x"}),
    )
    .await
    .expect(403);
    assert_eq!(t.broker.queue_info("/", "inbox").unwrap().ready, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_fetches_with_each_ack_mode() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.put("/api/queues/%2F/jobs", json!({})).await.expect(201);
    for body in ["one", "two", "three"] {
        publish(&t, "jobs", body).await;
    }
    // A look that puts them back.
    let got = c
        .post(
            "/api/queues/%2F/jobs/get",
            json!({"count": 2, "ackmode": "ack_requeue_true"}),
        )
        .await
        .expect(200)
        .json();
    let payloads: Vec<&str> = got
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["payload"].as_str().unwrap())
        .collect();
    assert_eq!(payloads, ["one", "two"]);
    assert_eq!(got[0]["redelivered"], false);
    assert_eq!(got[0]["payload_encoding"], "string");
    assert_eq!(got[0]["payload_bytes"], 3);
    assert_eq!(got[0]["routing_key"], "jobs");
    assert_eq!(t.broker.queue_info("/", "jobs").unwrap().ready, 3);

    // Taking them: requeued ones come first and say so.
    let got = c
        .post(
            "/api/queues/%2F/jobs/get",
            json!({"count": 10, "ackmode": "ack_requeue_false", "encoding": "base64", "truncate": 2}),
        )
        .await
        .expect(200)
        .json();
    let got = got.as_array().unwrap();
    assert_eq!(got.len(), 3);
    assert_eq!(got[0]["redelivered"], true);
    assert_eq!(got[0]["payload"], "b24="); // "on"
    assert_eq!(got[0]["payload_encoding"], "base64");
    assert_eq!(got[2]["redelivered"], false);
    let info = t.broker.queue_info("/", "jobs").unwrap();
    assert_eq!((info.ready, info.unacked), (0, 0));

    // An empty queue gives an empty list.
    let got = c
        .post(
            "/api/queues/%2F/jobs/get",
            json!({"count": 1, "ackmode": "reject_requeue_false"}),
        )
        .await
        .expect(200)
        .json();
    assert_eq!(got, json!([]));

    for bad in [
        json!({"count": 0, "ackmode": "ack_requeue_true"}),
        json!({"count": 1}),
        json!({"count": 1, "ackmode": "maybe"}),
        json!({"count": -1, "ackmode": "ack_requeue_true"}),
        json!({"count": 1, "ackmode": "ack_requeue_true", "encoding": "hex"}),
    ] {
        let r = c.post("/api/queues/%2F/jobs/get", bad.clone()).await;
        assert_eq!(r.status.as_u16(), 400, "{bad}: {:?}", r.body);
    }
    c.post(
        "/api/queues/%2F/missing/get",
        json!({"count": 1, "ackmode": "ack_requeue_true"}),
    )
    .await
    .expect(404);
    c.post(
        "/api/queues/nowhere/jobs/get",
        json!({"count": 1, "ackmode": "ack_requeue_true"}),
    )
    .await
    .expect(404);
}

/// Every route the router serves, with an example path: (method, template, example).
const ROUTES: &[(&str, &str, &str)] = &[
    ("get", "/api/overview", "/api/overview"),
    ("get", "/api/rates", "/api/rates"),
    ("get", "/api/vhosts", "/api/vhosts"),
    ("get", "/api/vhosts/{vhost}", "/api/vhosts/%2F"),
    ("put", "/api/vhosts/{vhost}", "/api/vhosts/%2F"),
    ("delete", "/api/vhosts/{vhost}", "/api/vhosts/gone"),
    ("get", "/api/exchanges", "/api/exchanges"),
    ("get", "/api/exchanges/{vhost}", "/api/exchanges/%2F"),
    (
        "get",
        "/api/exchanges/{vhost}/{name}",
        "/api/exchanges/%2F/x",
    ),
    (
        "put",
        "/api/exchanges/{vhost}/{name}",
        "/api/exchanges/%2F/x",
    ),
    (
        "delete",
        "/api/exchanges/{vhost}/{name}",
        "/api/exchanges/%2F/x",
    ),
    (
        "post",
        "/api/exchanges/{vhost}/{name}/publish",
        "/api/exchanges/%2F/x/publish",
    ),
    (
        "get",
        "/api/exchanges/{vhost}/{name}/partitions",
        "/api/exchanges/%2F/x/partitions",
    ),
    (
        "get",
        "/api/exchanges/{vhost}/{name}/bindings/source",
        "/api/exchanges/%2F/x/bindings/source",
    ),
    (
        "get",
        "/api/exchanges/{vhost}/{name}/bindings/destination",
        "/api/exchanges/%2F/x/bindings/destination",
    ),
    ("get", "/api/queues", "/api/queues"),
    ("get", "/api/queues/{vhost}", "/api/queues/%2F"),
    ("get", "/api/queues/{vhost}/{name}", "/api/queues/%2F/q"),
    ("put", "/api/queues/{vhost}/{name}", "/api/queues/%2F/q"),
    ("delete", "/api/queues/{vhost}/{name}", "/api/queues/%2F/q"),
    (
        "delete",
        "/api/queues/{vhost}/{name}/contents",
        "/api/queues/%2F/q/contents",
    ),
    (
        "post",
        "/api/queues/{vhost}/{name}/get",
        "/api/queues/%2F/q/get",
    ),
    (
        "get",
        "/api/queues/{vhost}/{name}/offsets",
        "/api/queues/%2F/q/offsets",
    ),
    (
        "get",
        "/api/queues/{vhost}/{name}/bindings",
        "/api/queues/%2F/q/bindings",
    ),
    ("get", "/api/bindings", "/api/bindings"),
    ("get", "/api/bindings/{vhost}", "/api/bindings/%2F"),
    (
        "get",
        "/api/bindings/{vhost}/e/{source}/q/{destination}",
        "/api/bindings/%2F/e/x/q/q",
    ),
    (
        "post",
        "/api/bindings/{vhost}/e/{source}/q/{destination}",
        "/api/bindings/%2F/e/x/q/q",
    ),
    (
        "get",
        "/api/bindings/{vhost}/e/{source}/q/{destination}/{props}",
        "/api/bindings/%2F/e/x/q/q/~",
    ),
    (
        "delete",
        "/api/bindings/{vhost}/e/{source}/q/{destination}/{props}",
        "/api/bindings/%2F/e/x/q/q/~",
    ),
    (
        "get",
        "/api/bindings/{vhost}/e/{source}/e/{destination}",
        "/api/bindings/%2F/e/x/e/y",
    ),
    (
        "post",
        "/api/bindings/{vhost}/e/{source}/e/{destination}",
        "/api/bindings/%2F/e/x/e/y",
    ),
    (
        "get",
        "/api/bindings/{vhost}/e/{source}/e/{destination}/{props}",
        "/api/bindings/%2F/e/x/e/y/~",
    ),
    (
        "delete",
        "/api/bindings/{vhost}/e/{source}/e/{destination}/{props}",
        "/api/bindings/%2F/e/x/e/y/~",
    ),
    ("get", "/api/connections", "/api/connections"),
    ("get", "/api/connections/{name}", "/api/connections/nobody"),
    (
        "delete",
        "/api/connections/{name}",
        "/api/connections/nobody",
    ),
    ("get", "/api/channels", "/api/channels"),
    ("get", "/api/consumers", "/api/consumers"),
    ("get", "/api/consumers/{vhost}", "/api/consumers/%2F"),
    ("get", "/api/events", "/api/events"),
    ("get", "/api/traces/{correlation_id}", "/api/traces/abc"),
    ("get", "/api/trace-settings", "/api/trace-settings"),
    ("put", "/api/trace-settings", "/api/trace-settings"),
    ("get", "/api/dlq", "/api/dlq"),
    (
        "get",
        "/api/queues/{vhost}/{name}/messages",
        "/api/queues/%2F/nope/messages",
    ),
    (
        "post",
        "/api/queues/{vhost}/{name}/redrive",
        "/api/queues/%2F/nope/redrive",
    ),
    ("get", "/api/redrives", "/api/redrives"),
    ("get", "/api/redrives/{id}", "/api/redrives/1"),
    ("get", "/api/whoami", "/api/whoami"),
    ("get", "/api/users", "/api/users"),
    ("get", "/api/users/{name}", "/api/users/nobody"),
    ("put", "/api/users/{name}", "/api/users/nobody"),
    ("delete", "/api/users/{name}", "/api/users/nobody"),
    (
        "get",
        "/api/users/{name}/permissions",
        "/api/users/nobody/permissions",
    ),
    (
        "get",
        "/api/vhosts/{vhost}/permissions",
        "/api/vhosts/%2F/permissions",
    ),
    ("get", "/api/permissions", "/api/permissions"),
    (
        "get",
        "/api/permissions/{vhost}/{user}",
        "/api/permissions/%2F/nobody",
    ),
    (
        "put",
        "/api/permissions/{vhost}/{user}",
        "/api/permissions/%2F/nobody",
    ),
    (
        "delete",
        "/api/permissions/{vhost}/{user}",
        "/api/permissions/%2F/nobody",
    ),
    ("get", "/api/openapi.json", "/api/openapi.json"),
    ("get", "/metrics", "/metrics"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_documents_every_route() {
    let t = TestServer::start().await;
    let doc = t.client.get("/api/openapi.json").await.expect(200).json();
    assert_eq!(doc, tern_http::openapi_document());
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    let mut documented = 0;
    for (method, template, example) in ROUTES {
        let op = &paths
            .get(*template)
            .unwrap_or_else(|| panic!("{template} is not documented"))[*method];
        assert!(op.is_object(), "{method} {template} is not documented");
        assert!(
            op["responses"].is_object(),
            "{method} {template} has no responses"
        );
        // Each parameter in the template is described.
        for part in template.split('/').filter(|p| p.starts_with('{')) {
            let name = part.trim_matches(['{', '}']);
            let described = op["parameters"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["name"] == name && p["in"] == "path");
            assert!(described, "{method} {template}: parameter {name}");
        }
        documented += 1;
        // The event stream never ends; tests/events.rs reads it.
        if *template == "/api/events" {
            continue;
        }
        // And the server serves it: whatever the answer, not "no such route".
        let reply = t
            .client
            .raw(&method.to_uppercase(), example, Some(b"{}"))
            .await;
        assert_ne!(reply.status.as_u16(), 405, "{method} {example}");
        if reply.status.as_u16() == 404 {
            let reason = reply.json()["reason"].as_str().unwrap().to_string();
            assert!(
                !reason.starts_with("no resource at"),
                "{method} {example}: {reason}"
            );
        }
    }
    // Every documented operation is one of the routes above.
    let operations: usize = paths.values().map(|p| p.as_object().unwrap().len()).sum();
    assert_eq!(operations, documented);
    // OpenAPI 3.0 schemas name one type each (null is `nullable`). In a
    // `properties` map the keys are field names (one is called `type`).
    fn types_are_single(v: &Value, at: &str, field_names: bool) {
        match v {
            Value::Object(map) => {
                for (k, child) in map {
                    if k == "type" && !field_names && !child.is_string() {
                        panic!("type at {at} is not a single name: {child}");
                    }
                    types_are_single(child, &format!("{at}/{k}"), k == "properties");
                }
            }
            Value::Array(items) => items.iter().for_each(|i| types_are_single(i, at, false)),
            _ => {}
        }
    }
    types_are_single(&doc, "", false);
    // Every $ref resolves.
    let text = doc.to_string();
    for piece in text.split("\"$ref\":\"#/").skip(1) {
        let target = piece.split('"').next().unwrap();
        let mut node = &doc;
        for key in target.split('/') {
            node = &node[key];
        }
        assert!(!node.is_null(), "unresolved $ref #/{target}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_api_route_needs_credentials() {
    let t = TestServer::start().await;
    let anon = t.client.with_auth(None);
    let wrong = t.client.with_auth(Some("Basic Z3Vlc3Q6d3Jvbmc="));
    for (method, template, example) in ROUTES {
        let open = *template == "/api/openapi.json" || *template == "/metrics";
        for client in [&anon, &wrong] {
            let r = client
                .raw(&method.to_uppercase(), example, Some(b"{}"))
                .await;
            if open {
                assert_eq!(r.status.as_u16(), 200, "{method} {example}");
            } else {
                assert_eq!(r.status.as_u16(), 401, "{method} {example}");
                assert_eq!(r.error(), "not_authorized");
            }
        }
    }
    // Nothing was changed by the refused requests.
    assert_eq!(t.broker.vhosts().len(), 1);
    assert!(t.broker.exchange_info("/", "x").is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_is_served_from_the_binary() {
    let t = TestServer::start().await;
    let anon = t.client.with_auth(None);
    let page = anon.get("/").await;
    page.expect(200);
    assert!(page.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(page.headers["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("default-src 'self'"));
    let html = String::from_utf8(page.body.to_vec()).unwrap();
    assert!(html.contains("/ui/app.js") && html.contains("/ui/app.css"));
    let script = anon.get("/ui/app.js").await;
    script.expect(200);
    assert!(script.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/javascript"));
    let style = anon.get("/ui/app.css").await;
    style.expect(200);
    // Nothing is loaded from elsewhere: browsers here cannot reach a CDN.
    for (name, body) in [
        ("index.html", &page.body),
        ("app.js", &script.body),
        ("app.css", &style.body),
    ] {
        // The SVG namespace is a name, not an address anything is loaded from.
        let text = String::from_utf8_lossy(body).replace("http://www.w3.org/2000/svg", "");
        assert!(
            !text.contains("http://") && !text.contains("https://") && !text.contains("//cdn"),
            "{name} refers to another origin"
        );
    }
    // The vendored chart library is served from here too, with its style.
    let uplot = anon.get("/ui/vendor/uPlot.iife.min.js").await;
    uplot.expect(200);
    assert!(String::from_utf8_lossy(&uplot.body).contains("uPlot"));
    anon.get("/ui/vendor/uPlot.min.css").await.expect(200);
    assert!(html.contains("/ui/vendor/uPlot.iife.min.js"));

    // The page's script asks for no browser login dialog: still a 401,
    // without the challenge.
    let r = anon
        .raw_with(
            "GET",
            "/api/overview",
            None,
            &[("x-requested-with", "XMLHttpRequest")],
        )
        .await;
    r.expect(401);
    assert!(!r.headers.contains_key("www-authenticate"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_serving() {
    let t = TestServer::start().await;
    t.client.get("/api/overview").await.expect(200);
    let addr = t.server.local_addr();
    t.server.shutdown().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
