//! Connections, channels and consumers over the API, with a real AMQP
//! client (lapin) against `tern-amqp` on the same broker: the listings
//! follow what the client opens and closes, and closing a connection by
//! name reaches the client with the reason, its unacked message returning.

#![allow(clippy::unwrap_used)] // a test helper that fails should panic

mod common;

use std::time::Duration;

use common::TestServer;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use serde_json::{json, Value};
use tern_amqp::AmqpServer;

/// Percent-encodes a path segment (connection names hold spaces and `>`).
fn encode(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Polls `path` until `done` holds of its JSON (or fails after 5 s).
async fn until(t: &TestServer, path: &str, done: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..100 {
        let v = t.client.get(path).await.expect(200).json();
        if done(&v) {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{path} never reached the expected state");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_follow_a_client_and_closing_it_reaches_it() {
    let t = TestServer::start().await;
    let amqp = AmqpServer::bind("127.0.0.1:0".parse().unwrap(), t.broker.clone())
        .await
        .unwrap();
    t.client
        .put("/api/queues/%2F/work", json!({}))
        .await
        .expect(201);
    // Nothing is connected yet; the API's own channels are not connections.
    assert_eq!(
        t.client.get("/api/connections").await.expect(200).json(),
        json!([])
    );

    let uri = format!("amqp://guest:guest@{}/%2F", amqp.local_addr());
    let conn = Connection::connect(&uri, ConnectionProperties::default())
        .await
        .unwrap();
    let ch1 = conn.create_channel().await.unwrap();
    ch1.basic_qos(5, BasicQosOptions::default()).await.unwrap();
    let _c1 = ch1
        .basic_consume(
            "work".into(),
            "c1".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let ch2 = conn.create_channel().await.unwrap();
    let _c2 = ch2
        .basic_consume(
            "work".into(),
            "c2".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();

    let conns = t.client.get("/api/connections").await.expect(200).json();
    let conns = conns.as_array().unwrap();
    assert_eq!(conns.len(), 1, "{conns:?}");
    let c = &conns[0];
    assert_eq!(c["user"], "guest");
    assert_eq!(c["vhost"], "/");
    assert_eq!(c["protocol"], "AMQP 0-9-1");
    assert_eq!(c["channels"], 2);
    assert_eq!(c["peer_host"], "127.0.0.1");
    assert_eq!(c["port"], amqp.local_addr().port());
    let name = c["name"].as_str().unwrap().to_string();
    assert!(
        name.ends_with(&format!("-> {}", amqp.local_addr())),
        "{name}"
    );
    let one = t
        .client
        .get(&format!("/api/connections/{}", encode(&name)))
        .await
        .expect(200)
        .json();
    assert_eq!(one["name"], name.as_str());
    // Paginated like every list.
    let page = t
        .client
        .get("/api/connections?page=1&page_size=1")
        .await
        .expect(200)
        .json();
    assert_eq!(page["total_count"], 1);

    let channels = t.client.get("/api/channels").await.expect(200).json();
    let channels = channels.as_array().unwrap();
    assert_eq!(channels.len(), 2, "{channels:?}");
    let numbers: Vec<u64> = channels
        .iter()
        .map(|c| c["number"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, [1, 2]);
    for ch in channels {
        assert_eq!(ch["connection_name"], name.as_str());
        assert_eq!(ch["consumer_count"], 1);
        assert_eq!(ch["name"], format!("{name} ({})", ch["number"]));
    }

    let consumers = t.client.get("/api/consumers").await.expect(200).json();
    let consumers = consumers.as_array().unwrap();
    assert_eq!(consumers.len(), 2, "{consumers:?}");
    let c1 = consumers
        .iter()
        .find(|c| c["consumer_tag"] == "c1")
        .unwrap();
    assert_eq!(c1["queue"], "work");
    assert_eq!(c1["prefetch_count"], 5);
    assert_eq!(c1["ack_mode"], "manual");
    assert_eq!(c1["channel"], format!("{name} (1)"));
    let c2 = consumers
        .iter()
        .find(|c| c["consumer_tag"] == "c2")
        .unwrap();
    assert_eq!(c2["ack_mode"], "auto");
    assert_eq!(c2["ack_required"], false);
    assert_eq!(
        t.client.get("/api/consumers/%2F").await.expect(200).json(),
        Value::Array(consumers.clone())
    );
    t.client
        .put("/api/vhosts/other", json!({}))
        .await
        .expect(201);
    assert_eq!(
        t.client
            .get("/api/consumers/other")
            .await
            .expect(200)
            .json(),
        json!([])
    );
    let missing = t.client.get("/api/consumers/nope").await;
    missing.expect(404);
    assert_eq!(missing.error(), "not_found");

    // A delivery to c1 waits for its ack: the channel shows it unacked.
    // (Round-robin may give the first message to c2, so publish two.)
    for body in ["a", "b"] {
        t.client
            .post(
                "/api/exchanges/%2F/amq.default/publish",
                json!({"routing_key": "work", "payload": body}),
            )
            .await
            .expect(200);
    }
    until(&t, "/api/channels", |v| {
        v.as_array()
            .unwrap()
            .iter()
            .any(|c| c["number"] == 1 && c["messages_unacknowledged"] == 1)
    })
    .await;

    // Cancelling a consumer takes it out of the listing.
    ch2.basic_cancel("c2".into(), Default::default())
        .await
        .unwrap();
    let after = t.client.get("/api/consumers").await.expect(200).json();
    let tags: Vec<&str> = after
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["consumer_tag"].as_str().unwrap())
        .collect();
    assert_eq!(tags, ["c1"]);

    // Closing: bad requests first, then the real one.
    let anon = t.client.with_auth(None);
    anon.delete(&format!("/api/connections/{}", encode(&name)))
        .await
        .expect(401);
    let long = "x".repeat(201);
    t.client
        .raw_with(
            "DELETE",
            &format!("/api/connections/{}", encode(&name)),
            None,
            &[("x-reason", &long)],
        )
        .await
        .expect(400);
    let unknown = t.client.delete("/api/connections/nobody").await;
    unknown.expect(404);
    assert_eq!(unknown.error(), "not_found");
    assert!(conn.status().connected());
    t.client
        .raw_with(
            "DELETE",
            &format!("/api/connections/{}", encode(&name)),
            None,
            &[("x-reason", "maintenance window")],
        )
        .await
        .expect(204);
    let closed_by_server = async {
        while conn.status().connected() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), closed_by_server)
        .await
        .unwrap();
    until(&t, "/api/connections", |v| v == &json!([])).await;
    until(&t, "/api/channels", |v| v == &json!([])).await;
    assert_eq!(
        t.client.get("/api/consumers").await.expect(200).json(),
        json!([])
    );
    // c1's unacked message went back to the queue.
    let q = until(&t, "/api/queues/%2F/work", |q| {
        q["messages_unacknowledged"] == 0
    })
    .await;
    assert!(q["messages_ready"].as_u64().unwrap() >= 1, "{q}");
    amqp.shutdown().await;
}

/// The connection named in the first item of `/api/connections`.
async fn only_connection(t: &TestServer) -> Value {
    let conns = t.client.get("/api/connections").await.expect(200).json();
    assert_eq!(conns.as_array().unwrap().len(), 1, "{conns}");
    conns[0].clone()
}

/// A connection's byte counters as `/metrics` shows them.
async fn scraped_bytes(t: &TestServer, name: &str) -> (f64, f64) {
    let text = t
        .client
        .with_auth(None)
        .get("/metrics")
        .await
        .expect(200)
        .body
        .clone();
    let text = String::from_utf8(text.to_vec()).unwrap();
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    let value = |family: &str| {
        let samples: Vec<_> = scrape
            .samples
            .iter()
            .filter(|s| s.metric == family && s.labels.get("connection") == Some(name))
            .collect();
        assert_eq!(samples.len(), 1, "{family}: {samples:?}");
        assert_eq!(samples[0].labels.get("user"), Some("guest"));
        match samples[0].value {
            prometheus_parse::Value::Counter(v) => v,
            ref other => panic!("{family} is not a counter: {other:?}"),
        }
    };
    (
        value("tern_connection_received_bytes_total"),
        value("tern_connection_sent_bytes_total"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_shows_the_bytes_it_sent_and_received() {
    let t = TestServer::start_with(
        tern_http::HttpConfig::default().with_rate_interval(Duration::from_millis(20)),
    )
    .await;
    let amqp = AmqpServer::bind("127.0.0.1:0".parse().unwrap(), t.broker.clone())
        .await
        .unwrap();
    t.client
        .put("/api/queues/%2F/bytes", json!({}))
        .await
        .expect(201);
    let uri = format!("amqp://guest:guest@{}/%2F", amqp.local_addr());
    let conn = Connection::connect(&uri, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    // The handshake went both ways already.
    let before = only_connection(&t).await;
    let name = before["name"].as_str().unwrap().to_string();
    let (recv0, sent0) = (
        before["recv_oct"].as_u64().unwrap(),
        before["send_oct"].as_u64().unwrap(),
    );
    assert!(recv0 > 8 && sent0 > 0, "{before}");

    // 64 KiB published: at least that much more received. Fetching it
    // back: at least that much more sent. Rates show while it flows.
    let body = vec![7u8; 64 * 1024];
    let confirm = lapin::options::ConfirmSelectOptions::default();
    ch.confirm_select(confirm).await.unwrap();
    let mut saw_recv_rate = false;
    for _ in 0..200 {
        ch.basic_publish(
            "".into(),
            "bytes".into(),
            Default::default(),
            &body,
            Default::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
        let c = only_connection(&t).await;
        if c["recv_oct_details"]["rate"].as_f64().unwrap() > 0.0 {
            saw_recv_rate = true;
            break;
        }
    }
    assert!(saw_recv_rate, "a receive rate while publishing");
    let after_publish = only_connection(&t).await;
    let recv1 = after_publish["recv_oct"].as_u64().unwrap();
    assert!(
        recv1 >= recv0 + body.len() as u64,
        "{recv0} then {after_publish}"
    );
    let got = ch
        .basic_get(
            "bytes".into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.delivery.data.len(), body.len());
    let after_get = only_connection(&t).await;
    let sent1 = after_get["send_oct"].as_u64().unwrap();
    assert!(
        sent1 >= sent0 + body.len() as u64,
        "{sent0} then {after_get}"
    );
    assert!(after_get["send_oct_details"]["rate"].as_f64().unwrap() >= 0.0);

    // /metrics: the same counters, as Prometheus counters of the connection.
    let (recv, sent) = scraped_bytes(&t, &name).await;
    assert!(recv >= recv1 as f64, "{recv} < {recv1}");
    assert!(sent >= sent1 as f64, "{sent} < {sent1}");
    conn.close(200, "bye".into()).await.unwrap();
    amqp.shutdown().await;
}
