//! What users who are not administrators see and change, by RabbitMQ's
//! management rules: a `management` user sees only the vhosts they have
//! permissions in, in every listing across vhosts (queues, exchanges,
//! bindings, consumers, vhosts, dead-letter queues, redrives, traces, the
//! overview's totals, the rate history and the event stream), and only
//! their own connections and channels; a `monitoring` user sees everything.
//! Both may declare, delete, bind, publish, get and purge where their
//! permission patterns allow, and nowhere else.

#![allow(clippy::unwrap_used)] // a test helper that fails should panic

mod common;

use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use common::{Client, TestServer};
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tern_broker::{
    ConnectionMeta, ConnectionTraffic, ConsumeOptions, ExchangeName, Message, Properties,
    TraceSettings,
};
use tern_http::HttpConfig;

fn basic(client: &Client, user: &str, password: &str) -> Client {
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    client.with_auth(Some(&format!("Basic {token}")))
}

fn auth_header(user: &str, password: &str) -> String {
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {token}")
}

async fn user(t: &TestServer, name: &str, tags: &str) -> Client {
    t.client
        .put(
            &format!("/api/users/{name}"),
            json!({"password": "pw", "tags": tags}),
        )
        .await
        .expect(201);
    basic(&t.client, name, "pw")
}

async fn permit(t: &TestServer, vhost: &str, user: &str, configure: &str, write: &str, read: &str) {
    t.client
        .put(
            &format!("/api/permissions/{vhost}/{user}"),
            json!({"configure": configure, "write": write, "read": read}),
        )
        .await
        .expect(201);
}

fn message(routing_key: &str, correlation_id: &str) -> Message {
    Message {
        exchange: ExchangeName::default_exchange(),
        routing_key: routing_key.into(),
        properties: Properties {
            correlation_id: Some(correlation_id.into()),
            ..Properties::default()
        },
        body: Bytes::from_static(b"m"),
    }
}

fn meta(port: u16, user: &str, vhost: &str) -> ConnectionMeta {
    ConnectionMeta {
        peer: format!("127.0.0.1:{port}").parse().unwrap(),
        local: "127.0.0.1:5672".parse().unwrap(),
        user: user.into(),
        vhost: vhost.into(),
        protocol: "AMQP 0-9-1".into(),
        traffic: ConnectionTraffic::default(),
    }
}

/// The values of `key` in a JSON array of objects, sorted.
fn field(list: &Value, key: &str) -> Vec<String> {
    let mut out: Vec<String> = list
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .map(|i| i[key].as_str().unwrap_or_default().to_string())
        .collect();
    out.sort();
    out
}

/// The first `snapshot` event of `/api/events` as `auth` sees it.
async fn first_snapshot(t: &TestServer, auth: &str) -> Value {
    let stream = tokio::net::TcpStream::connect(t.server.local_addr())
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = Request::get("/api/events")
        .header("host", "tern")
        .header("authorization", auth)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let mut body = response.into_body();
    let mut buffer = String::new();
    loop {
        if let Some(end) = buffer.find("\n\n") {
            let data: String = buffer[..end]
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(str::trim_start)
                .collect();
            if !data.is_empty() {
                return serde_json::from_str(&data).unwrap();
            }
            buffer.drain(..end + 2);
            continue;
        }
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Ok(data) = frame.into_data() {
            buffer.push_str(std::str::from_utf8(&data).unwrap());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_users_see_only_their_vhosts_and_connections() {
    let t =
        TestServer::start_with(HttpConfig::default().with_rate_interval(Duration::from_millis(20)))
            .await;
    // `staging` holds a queue, an exchange bound to it and a dead-letter
    // queue; `/` holds one queue. ann may use `/` only; mon monitors.
    t.client
        .put("/api/vhosts/staging", json!({}))
        .await
        .expect(201);
    for q in ["secret", "secret.dlq"] {
        t.client
            .put(&format!("/api/queues/staging/{q}"), json!({}))
            .await
            .expect(201);
    }
    t.client
        .put("/api/exchanges/staging/hidden", json!({"type": "fanout"}))
        .await
        .expect(201);
    t.client
        .post("/api/bindings/staging/e/hidden/q/secret", json!({}))
        .await
        .expect(201);
    t.client
        .put("/api/queues/%2F/mine", json!({}))
        .await
        .expect(201);
    t.client
        .put("/api/queues/%2F/mine.dlq", json!({}))
        .await
        .expect(201);
    t.client
        .post("/api/bindings/%2F/e/amq.direct/q/mine", json!({}))
        .await
        .expect(201);
    let ann = user(&t, "ann", "management").await;
    permit(&t, "%2F", "ann", ".*", ".*", ".*").await;
    let mon = user(&t, "mon", "monitoring").await;
    let pol = user(&t, "pol", "policymaker").await;

    // Traffic in both vhosts, one flow across them, a consumer in each.
    t.broker.set_tracing(Some(TraceSettings {
        capacity: 100,
        sample_one_in: 1,
    }));
    for (vhost, key, id) in [
        ("/", "mine", "flow"),
        ("staging", "secret", "flow"),
        ("staging", "secret.dlq", "x"),
    ] {
        let published = t.broker.publish(vhost, message(key, id)).unwrap();
        published.confirmed().await.unwrap();
    }
    let mine_id = t.broker.new_connection_id();
    let _mine = t
        .broker
        .register_connection(mine_id, meta(50001, "ann", "/"));
    let mut mine_ch = t.broker.open_channel("/", mine_id).unwrap();
    mine_ch.consume("mine", ConsumeOptions::default()).unwrap();
    let theirs_id = t.broker.new_connection_id();
    let _theirs = t
        .broker
        .register_connection(theirs_id, meta(50002, "guest", "staging"));
    let mut theirs_ch = t.broker.open_channel("staging", theirs_id).unwrap();
    theirs_ch
        .consume("secret", ConsumeOptions::default())
        .unwrap();
    // A sample of the rates after the publishes.
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Lists across vhosts: ann sees `/` only; mon and guest see both.
    let ann_vhosts = field(&ann.get("/api/vhosts").await.expect(200).json(), "name");
    assert_eq!(ann_vhosts, ["/"]);
    let mon_vhosts = field(&mon.get("/api/vhosts").await.expect(200).json(), "name");
    assert_eq!(mon_vhosts, ["/", "staging"]);
    assert_eq!(
        field(&pol.get("/api/vhosts").await.expect(200).json(), "name"),
        Vec::<String>::new(),
        "a policymaker without permissions sees no vhost"
    );
    for path in [
        "/api/queues",
        "/api/exchanges",
        "/api/bindings",
        "/api/consumers",
        "/api/dlq",
    ] {
        let vhosts = field(&ann.get(path).await.expect(200).json(), "vhost");
        assert!(!vhosts.is_empty(), "{path}: ann sees her own vhost");
        assert!(vhosts.iter().all(|v| v == "/"), "{path}: {vhosts:?}");
        let all = field(&mon.get(path).await.expect(200).json(), "vhost");
        assert!(all.iter().any(|v| v == "staging"), "{path}: {all:?}");
    }
    // Paginated, the counts are of what she sees too.
    let page = ann
        .get("/api/queues?page=1&page_size=10")
        .await
        .expect(200)
        .json();
    assert_eq!(page["total_count"], 2);

    // Connections and channels: only her own; mon sees both.
    let conns = ann.get("/api/connections").await.expect(200).json();
    assert_eq!(field(&conns, "user"), ["ann"]);
    assert_eq!(
        field(&mon.get("/api/connections").await.json(), "user"),
        ["ann", "guest"]
    );
    let channels = ann.get("/api/channels").await.expect(200).json();
    assert_eq!(field(&channels, "vhost"), ["/"]);
    assert_eq!(
        field(&mon.get("/api/channels").await.json(), "vhost"),
        ["/", "staging"]
    );
    let theirs_name = "127.0.0.1:50002 -> 127.0.0.1:5672";
    let theirs_path = "/api/connections/127.0.0.1%3A50002%20-%3E%20127.0.0.1%3A5672";
    ann.get(theirs_path).await.expect(404);
    mon.get(theirs_path).await.expect(200);
    // Closing: not someone else's (404 unseen, 403 seen), but one's own.
    assert_eq!(
        ann.delete(theirs_path).await.expect(404).error(),
        "not_found"
    );
    let r = mon.delete(theirs_path).await;
    r.expect(403);
    assert!(r.json()["reason"].as_str().unwrap().contains("'mon'"));
    assert!(t.broker.connections().iter().any(|c| c.name == theirs_name));
    ann.delete("/api/connections/127.0.0.1%3A50001%20-%3E%20127.0.0.1%3A5672")
        .await
        .expect(204);

    // The overview counts her vhost only.
    let o = ann.get("/api/overview").await.expect(200).json();
    assert_eq!(o["object_totals"]["vhosts"], 1);
    assert_eq!(o["object_totals"]["queues"], 2);
    assert_eq!(o["queue_totals"]["messages"], 1);
    let o = mon.get("/api/overview").await.expect(200).json();
    assert_eq!(o["object_totals"]["vhosts"], 2);
    assert_eq!(o["object_totals"]["queues"], 4);

    // The rate history: her queues, her depths.
    let rates = ann.get("/api/rates").await.expect(200).json();
    assert_eq!(field(&rates["queues"], "vhost"), ["/", "/"]);
    let last = rates["samples"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["messages"], 1, "{last}");
    let rates = mon.get("/api/rates").await.expect(200).json();
    let last = rates["samples"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["messages"], 3, "{last}");

    // The trace of the flow shows only the message published in `/`.
    let trace = ann.get("/api/traces/flow").await.expect(200).json();
    assert_eq!(field(&trace["messages"], "vhost"), ["/"]);
    ann.get("/api/traces/x").await.expect(404);
    let trace = mon.get("/api/traces/flow").await.expect(200).json();
    assert_eq!(field(&trace["messages"], "vhost"), ["/", "staging"]);

    // The event stream: the same view, snapshot by snapshot.
    let snap = first_snapshot(&t, &auth_header("ann", "pw")).await;
    assert_eq!(field(&snap["queues"], "vhost"), ["/", "/"]);
    assert!(field(&snap["dlqs"], "vhost").iter().all(|v| v == "/"));
    assert!(field(&snap["consumers"], "vhost").iter().all(|v| v == "/"));
    // Her connection was only asked to close; its front door (none here)
    // would end it.
    assert_eq!(field(&snap["connections"], "user"), ["ann"]);
    assert_eq!(snap["overview"]["object_totals"]["vhosts"], 1);
    let snap = first_snapshot(&t, &auth_header("mon", "pw")).await;
    assert_eq!(field(&snap["connections"], "user"), ["ann", "guest"]);
    assert_eq!(snap["overview"]["object_totals"]["vhosts"], 2);

    // Per-vhost routes: 403 for a vhost she may not use, 404 for none.
    for path in [
        "/api/queues/staging",
        "/api/queues/staging/secret",
        "/api/consumers/staging",
        "/api/exchanges/staging/hidden/bindings/source",
    ] {
        let r = ann.get(path).await;
        assert_eq!(r.status.as_u16(), 403, "{path}");
        assert_eq!(r.error(), "access_refused", "{path}");
    }
    ann.get("/api/queues/nowhere").await.expect(404);
    // A monitoring user reads every vhost's entities.
    mon.get("/api/queues/staging/secret").await.expect(200);

    // Granted access shows at once.
    permit(&t, "staging", "ann", "", "", "").await;
    let ann_vhosts = field(&ann.get("/api/vhosts").await.expect(200).json(), "name");
    assert_eq!(ann_vhosts, ["/", "staging"]);
    ann.get("/api/queues/staging/secret").await.expect(200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_users_change_what_their_permissions_allow() {
    let t = TestServer::start().await;
    t.client
        .put("/api/vhosts/staging", json!({}))
        .await
        .expect(201);
    t.client
        .put("/api/queues/%2F/other", json!({}))
        .await
        .expect(201);
    t.client
        .put("/api/exchanges/%2F/other.x", json!({"type": "direct"}))
        .await
        .expect(201);
    let ann = user(&t, "ann", "management").await;
    // Configure and read `ann.*`; write `ann.*` and the default exchange.
    permit(
        &t,
        "%2F",
        "ann",
        "^ann\\.",
        "^(ann\\.|amq\\.default$)",
        "^ann\\.",
    )
    .await;

    let refused = |r: &common::Reply, what: &str| {
        assert_eq!(r.status.as_u16(), 403, "{what}: {:?}", r.body);
        assert_eq!(r.error(), "access_refused", "{what}");
        assert!(
            r.json()["reason"].as_str().unwrap().contains("'ann'"),
            "{what}"
        );
    };

    // Declaring: her names only.
    ann.put("/api/queues/%2F/ann.q", json!({}))
        .await
        .expect(201);
    ann.put("/api/queues/%2F/ann.q", json!({}))
        .await
        .expect(204);
    ann.put("/api/queues/%2F/ann.q", json!({"durable": false}))
        .await
        .expect(409);
    ann.put("/api/queues/%2F/ann.bad", json!({"arguments": 7}))
        .await
        .expect(400);
    refused(&ann.put("/api/queues/%2F/theirs", json!({})).await, "queue");
    assert!(t.broker.queue_info("/", "theirs").is_err());
    ann.put("/api/exchanges/%2F/ann.x", json!({"type": "direct"}))
        .await
        .expect(201);
    refused(
        &ann.put("/api/exchanges/%2F/their.x", json!({"type": "direct"}))
            .await,
        "exchange",
    );

    // Binding: write on the destination, read on the source.
    ann.post(
        "/api/bindings/%2F/e/ann.x/q/ann.q",
        json!({"routing_key": "k"}),
    )
    .await
    .expect(201);
    refused(
        &ann.post(
            "/api/bindings/%2F/e/amq.direct/q/ann.q",
            json!({"routing_key": "k"}),
        )
        .await,
        "binding from an exchange she may not read",
    );
    refused(
        &ann.post(
            "/api/bindings/%2F/e/ann.x/q/other",
            json!({"routing_key": "k"}),
        )
        .await,
        "binding to a queue she may not write",
    );
    refused(
        &ann.post(
            "/api/bindings/%2F/e/ann.x/e/other.x",
            json!({"routing_key": "k"}),
        )
        .await,
        "binding to an exchange she may not write",
    );

    // Publishing: to her exchange and the default one, not to others.
    let r = ann
        .post(
            "/api/exchanges/%2F/ann.x/publish",
            json!({"routing_key": "k", "payload": "one", "payload_encoding": "string", "properties": {}}),
        )
        .await;
    assert_eq!(r.expect(200).json()["routed"], true);
    ann.post(
        "/api/exchanges/%2F/amq.default/publish",
        json!({"routing_key": "ann.q", "payload": "two", "payload_encoding": "string", "properties": {}}),
    )
    .await
    .expect(200);
    refused(
        &ann.post(
            "/api/exchanges/%2F/other.x/publish",
            json!({"routing_key": "k", "payload": "x", "payload_encoding": "string", "properties": {}}),
        )
        .await,
        "publish",
    );

    // Reading: peek, get and purge her queue, not another's.
    let peeked = ann
        .get("/api/queues/%2F/ann.q/messages?peek=5")
        .await
        .expect(200)
        .json();
    assert_eq!(peeked.as_array().unwrap().len(), 2);
    let got = ann
        .post(
            "/api/queues/%2F/ann.q/get",
            json!({"count": 1, "ackmode": "ack_requeue_false", "encoding": "auto"}),
        )
        .await;
    assert_eq!(got.expect(200).json()[0]["payload"], "one");
    ann.delete("/api/queues/%2F/ann.q/contents")
        .await
        .expect(204);
    assert_eq!(t.broker.queue_info("/", "ann.q").unwrap().ready, 0);
    for (method, path) in [
        ("POST", "/api/queues/%2F/other/get"),
        ("GET", "/api/queues/%2F/other/messages?peek=1"),
        ("DELETE", "/api/queues/%2F/other/contents"),
    ] {
        let body = (method == "POST").then(|| {
            br#"{"count": 1, "ackmode": "ack_requeue_true", "encoding": "auto"}"#.as_slice()
        });
        refused(&ann.raw(method, path, body).await, path);
    }
    // HEAD runs the GET handler, so it is checked alike.
    let head = ann
        .raw("HEAD", "/api/queues/%2F/other/messages?peek=1", None)
        .await;
    assert_eq!(head.status.as_u16(), 403);
    assert_eq!(t.broker.queue_info("/", "other").unwrap().ready, 0);

    // Deleting: hers, not others'; a missing one of hers is 404.
    refused(&ann.delete("/api/queues/%2F/other").await, "delete queue");
    refused(
        &ann.delete("/api/exchanges/%2F/other.x").await,
        "delete exchange",
    );
    let bindings = ann
        .get("/api/bindings/%2F/e/ann.x/q/ann.q")
        .await
        .expect(200)
        .json();
    let props = bindings[0]["properties_key"].as_str().unwrap().to_string();
    ann.delete(&format!("/api/bindings/%2F/e/ann.x/q/ann.q/{props}"))
        .await
        .expect(204);
    ann.delete("/api/queues/%2F/ann.q").await.expect(204);
    ann.delete("/api/queues/%2F/ann.q").await.expect(404);
    ann.delete("/api/exchanges/%2F/ann.x").await.expect(204);
    assert!(t.broker.queue_info("/", "other").is_ok());
    assert!(t.broker.exchange_info("/", "other.x").is_ok());

    // A vhost she has no permissions in is 403, one that does not exist 404.
    refused(
        &ann.put("/api/queues/staging/ann.q", json!({})).await,
        "other vhost",
    );
    ann.put("/api/queues/nowhere/ann.q", json!({}))
        .await
        .expect(404);
    // Wrong credentials are 401 before anything else.
    basic(&t.client, "ann", "wrong")
        .put("/api/queues/%2F/ann.q", json!({}))
        .await
        .expect(401);

    // What stays with administrators.
    for (method, path, body) in [
        ("POST", "/api/queues/%2F/other/redrive", json!({})),
        ("PUT", "/api/trace-settings", json!({"enabled": true})),
        ("PUT", "/api/vhosts/mine", json!({})),
        (
            "PUT",
            "/api/users/ann",
            json!({"password": "x", "tags": "administrator"}),
        ),
        (
            "PUT",
            "/api/permissions/%2F/ann",
            json!({"configure": ".*", "write": ".*", "read": ".*"}),
        ),
    ] {
        let body = body.to_string();
        refused(&ann.raw(method, path, Some(body.as_bytes())).await, path);
    }

    // A permission taken away applies to the next request.
    t.client
        .delete("/api/permissions/%2F/ann")
        .await
        .expect(204);
    refused(
        &ann.put("/api/queues/%2F/ann.q", json!({})).await,
        "after revoke",
    );
}
