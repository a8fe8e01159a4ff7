//! The dashboard in a real browser: headless Chromium driven over WebDriver
//! (Debian's `chromium` and `chromium-driver`), against a real server. It
//! logs in (after a refused password), sees the overview's rate charts
//! drawn by uPlot from `/api/rates`, sees a queue fill up after publishes
//! (pushed over the event stream, no reload), peeks, purges and sees the
//! depth drop, publishes from the form, then opens the dead-letter page,
//! opens the queue's own page (bindings, peek, publish), a stream's page
//! with its offsets, the exchanges page with rates, the users and
//! permissions page (adding a user, setting and clearing permissions,
//! deleting the user), browses a dead-letter queue with its `x-death` decoded, redrives it and
//! sees the progress bar complete and the depth drop, and finally looks a
//! message flow up on the trace page, and on the connections page sees an
//! AMQP client (lapin) with its bytes and their rates and its consumer, and
//! closes it. A screenshot of each
//! step goes to `$CARGO_TARGET_TMPDIR/dashboard/`.
//!
//! Skipped, with a printed line, where Chromium or its driver is missing
//! (`TERN_TEST_CHROMEDRIVER` and `TERN_TEST_CHROMIUM` point elsewhere).

#![allow(clippy::unwrap_used)] // a test helper that fails should panic

mod common;

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use common::{Client, TestServer};
use serde_json::{json, Value};
use tern_broker::{ExchangeName, Message, Properties, QueueDeclare};

/// The W3C WebDriver key of an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn tool(var: &str, default: &str) -> Option<PathBuf> {
    let path = PathBuf::from(std::env::var(var).unwrap_or_else(|_| default.to_string()));
    path.is_file().then_some(path)
}

/// A chromedriver process, killed when dropped.
struct Driver {
    child: Child,
    client: Client,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One browser session.
struct Browser {
    driver: Driver,
    session: String,
    shots: PathBuf,
}

async fn wait_for<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(15);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Browser {
    async fn start(chromedriver: PathBuf, chromium: PathBuf) -> Browser {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let child = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let driver = Driver {
            child,
            client: Client { addr, auth: None },
        };
        wait_for("chromedriver", || async {
            tokio::net::TcpStream::connect(addr).await.is_ok()
        })
        .await;
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1100,800"],
            },
        }}});
        let reply = driver.client.post("/session", caps).await;
        reply.expect(200);
        let session = reply.json()["value"]["sessionId"]
            .as_str()
            .unwrap()
            .to_string();
        let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
        std::fs::create_dir_all(&shots).unwrap();
        println!("screenshots in {}", shots.display());
        Browser {
            driver,
            session,
            shots,
        }
    }

    async fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let path = format!("/session/{}{path}", self.session);
        let body = body.to_string();
        let reply = self
            .driver
            .client
            .raw(method, &path, (method == "POST").then_some(body.as_bytes()))
            .await;
        reply.expect(200);
        reply.json()["value"].clone()
    }

    async fn go(&self, url: &str) {
        self.call("POST", "/url", json!({ "url": url })).await;
    }

    /// The element `css` selects, if there is one.
    async fn find(&self, css: &str) -> Option<String> {
        let path = format!("/session/{}/element", self.session);
        let body = json!({"using": "css selector", "value": css}).to_string();
        let reply = self
            .driver
            .client
            .raw("POST", &path, Some(body.as_bytes()))
            .await;
        (reply.status.as_u16() == 200)
            .then(|| reply.json()["value"][ELEMENT].as_str().unwrap().to_string())
    }

    async fn element(&self, css: &str) -> String {
        self.find(css)
            .await
            .unwrap_or_else(|| panic!("no element {css}"))
    }

    /// The element's text; empty if it is missing, or was replaced (the
    /// page redraws tables when live data changes) between find and read.
    async fn text(&self, css: &str) -> String {
        let Some(id) = self.find(css).await else {
            return String::new();
        };
        let path = format!("/session/{}/element/{id}/text", self.session);
        let reply = self.driver.client.raw("GET", &path, None).await;
        if reply.status.as_u16() != 200 {
            return String::new();
        }
        reply.json()["value"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    async fn type_into(&self, css: &str, text: &str) {
        let id = self.element(css).await;
        self.call("POST", &format!("/element/{id}/clear"), json!({}))
            .await;
        self.call(
            "POST",
            &format!("/element/{id}/value"),
            json!({ "text": text }),
        )
        .await;
    }

    /// Clicks the element, finding it again if the page replaced it
    /// between find and click.
    async fn click(&self, css: &str) {
        for _ in 0..20 {
            let id = self.element(css).await;
            let path = format!("/session/{}/element/{id}/click", self.session);
            let reply = self.driver.client.raw("POST", &path, Some(b"{}")).await;
            if reply.status.as_u16() == 200 {
                return;
            }
            assert!(
                String::from_utf8_lossy(&reply.body).contains("stale element"),
                "click on {css}: {}",
                String::from_utf8_lossy(&reply.body)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{css} kept being replaced");
    }

    /// Waits until `css` selects something (drawn by a script, later).
    async fn wait_element(&self, css: &str) {
        wait_for(css, || async { self.find(css).await.is_some() }).await;
    }

    async fn wait_text(&self, css: &str, want: impl Fn(&str) -> bool) {
        wait_for(css, || async { want(&self.text(css).await) }).await;
    }

    async fn screenshot(&self, name: &str) {
        let png = self.call("GET", "/screenshot", json!({})).await;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap())
            .unwrap();
        std::fs::write(self.shots.join(format!("{name}.png")), bytes).unwrap();
    }

    async fn close(self) {
        let path = format!("/session/{}", self.session);
        let _ = self.driver.client.raw("DELETE", &path, None).await;
    }
}

async fn publish(t: &TestServer, queue: &str, body: &str) {
    let m = Message {
        exchange: ExchangeName::default_exchange(),
        routing_key: queue.into(),
        properties: Properties::default(),
        body: Bytes::copy_from_slice(body.as_bytes()),
    };
    t.broker.publish("/", m).unwrap().confirmed().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_works_in_a_browser() {
    let (Some(chromedriver), Some(chromium)) = (
        tool("TERN_TEST_CHROMEDRIVER", "/usr/bin/chromedriver"),
        tool("TERN_TEST_CHROMIUM", "/usr/bin/chromium"),
    ) else {
        println!("skipped: no chromium or chromedriver (apt-get install chromium chromium-driver)");
        return;
    };
    // The process's recorder, so that the rates have counters; sampled
    // twice a second so the charts fill quickly.
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .unwrap();
    let config = tern_http::HttpConfig::default()
        .with_metrics(tern_http::MetricsSource::new(move || handle.render()))
        .with_rate_interval(Duration::from_millis(500));
    let t = TestServer::start_with(config).await;
    let conn = t.broker.new_connection_id();
    t.broker
        .declare_queue("/", QueueDeclare::new("orders"), conn)
        .await
        .unwrap();
    let b = Browser::start(chromedriver, chromium).await;
    b.go(&format!("http://{}/", t.server.local_addr())).await;
    b.screenshot("1-login").await;

    // A wrong password is refused on the page.
    b.type_into("#login input[name=password]", "wrong").await;
    b.click("#login button").await;
    b.wait_text("#login-error", |t| t.contains("refused")).await;

    b.type_into("#login input[name=password]", "guest").await;
    b.click("#login button").await;

    // The overview: uPlot draws the rates once two samples exist.
    for i in 0..5 {
        publish(&t, "orders", &format!("warm-up {i}")).await;
    }
    b.wait_element("#rate-chart .uplot canvas").await;
    wait_for("the rate chart to have points", || async {
        let id = b.element("#rate-chart").await;
        let points = b
            .call(
                "GET",
                &format!("/element/{id}/attribute/data-points"),
                json!({}),
            )
            .await;
        points
            .as_str()
            .and_then(|p| p.parse::<u32>().ok())
            .unwrap_or(0)
            >= 3
    })
    .await;
    b.wait_text("#r-publish", |t| t != "-" && !t.is_empty())
        .await;
    b.wait_element("#depth-chart .uplot canvas").await;
    b.screenshot("0-overview").await;
    t.client
        .raw("DELETE", "/api/queues/%2F/orders/contents", None)
        .await
        .expect(204);
    t.client
        .post(
            "/api/bindings/%2F/e/amq.direct/q/orders",
            json!({"routing_key": "orders"}),
        )
        .await
        .expect(201);

    b.click("#tabs button[data-page=queues-page]").await;
    let ready = "tr[data-queue=orders] td:nth-child(4)";
    b.wait_text(ready, |t| t == "0").await;

    // Messages published meanwhile show up on the next refresh.
    for i in 0..3 {
        publish(&t, "orders", &format!("order {i}")).await;
    }
    b.wait_text(ready, |t| t == "3").await;
    b.wait_text("#t-ready", |t| t == "3").await;
    b.screenshot("2-queues").await;

    b.click("tr[data-queue=orders] button:nth-child(1)").await;
    b.wait_text("#peek", |t| {
        t.contains("3 message(s)") && t.contains("order 2")
    })
    .await;
    b.screenshot("3-peek").await;
    // Peeking left them in the queue.
    assert_eq!(t.broker.queue_info("/", "orders").unwrap().ready, 3);

    b.click("tr[data-queue=orders] button:nth-child(2)").await;
    b.call("POST", "/alert/accept", json!({})).await;
    b.wait_text(ready, |t| t == "0").await;
    assert_eq!(t.broker.queue_info("/", "orders").unwrap().ready, 0);
    b.screenshot("4-purged").await;

    b.type_into("#publish input[name=routing_key]", "orders")
        .await;
    b.type_into("#publish input[name=payload]", "from the form")
        .await;
    b.click("#publish button").await;
    b.wait_text("#publish-result", |t| t == "routed").await;
    b.wait_text(ready, |t| t == "1").await;
    b.screenshot("5-published").await;
    // The queues table draws each queue's depth over the sampled history.
    b.wait_element("tr[data-queue=orders] svg.spark path").await;

    // The queue's own page.
    b.click("tr[data-queue=orders] a.queue-link").await;
    b.wait_text("#queue-title", |t| t == "orders (/)").await;
    b.wait_text("#queue-facts", |t| t.contains("ready")).await;
    b.wait_text("#queue-bindings tbody", |t| t.contains("amq.direct"))
        .await;
    b.type_into("#queue-publish input[name=payload]", "from the queue page")
        .await;
    b.click("#queue-publish button").await;
    b.wait_text("#queue-publish-result", |t| t == "published")
        .await;
    b.click("#queue-peek").await;
    b.wait_text("#queue-messages", |t| {
        t.contains("2 message(s)") && t.contains("from the queue page")
    })
    .await;
    b.wait_element("#queue-chart .uplot canvas").await;
    b.screenshot("5a-queue").await;

    // A stream's page shows its offsets.
    t.client
        .put(
            "/api/queues/%2F/audit",
            json!({"durable": true, "arguments": {"x-queue-type": "stream"}}),
        )
        .await
        .expect(201);
    publish(&t, "audit", "entry").await;
    b.click("#queue-back").await;
    b.wait_element("tr[data-queue=audit] a.queue-link").await;
    b.click("tr[data-queue=audit] a.queue-link").await;
    b.wait_text("#queue-offsets-range", |t| t == "offsets 0 to 1")
        .await;
    b.screenshot("5b-stream").await;

    // Exchanges, with their rates.
    b.click("#tabs button[data-page=exchanges-page]").await;
    b.wait_text("#exchanges tbody", |t| {
        t.contains("amq.topic") && t.contains("(default exchange)")
    })
    .await;
    b.screenshot("5c-exchanges").await;

    // Users and permissions as listed.
    b.click("#tabs button[data-page=users-page]").await;
    b.wait_text("#users tbody", |t| {
        t.contains("guest") && t.contains("administrator")
    })
    .await;
    b.wait_text("#permissions tbody", |t| t.contains(".*"))
        .await;
    b.screenshot("5d-users").await;

    // An administrator adds a user, gives and clears permissions, and
    // deletes the user, from the same page.
    b.type_into("#user-form input[name=name]", "ann").await;
    b.type_into("#user-form input[name=password]", "s3cret")
        .await;
    b.click("#user-form button[type=submit]").await;
    b.wait_text("#users tbody", |t| {
        t.contains("ann") && t.contains("management")
    })
    .await;
    assert!(t
        .broker
        .authenticate("ann", "s3cret", None)
        .await
        .is_ok_and(|u| u.tags() == [tern_broker::UserTag::Management]));
    b.type_into("#permission-form input[name=user]", "ann")
        .await;
    b.type_into("#permission-form input[name=configure]", "^ann\\.")
        .await;
    b.type_into("#permission-form input[name=read]", "").await;
    b.click("#permission-form button[type=submit]").await;
    b.wait_element("#permissions tr[data-permission='/ ann']")
        .await;
    let granted = t.broker.permission("/", "ann").unwrap().permissions;
    assert_eq!(granted.configure.as_str(), "^ann\\.");
    assert_eq!(granted.write.as_str(), ".*");
    assert_eq!(granted.read.as_str(), "");
    b.screenshot("5e-users-edited").await;
    b.click("#permissions tr[data-permission='/ ann'] button")
        .await;
    b.wait_text("#permission-result", |t| t.contains("cleared ann"))
        .await;
    assert!(t.broker.permission("/", "ann").is_err());
    b.click("#users tr[data-user=ann] button").await;
    b.wait_text("#users tbody", |t| {
        t.contains("guest") && !t.contains("ann")
    })
    .await;
    assert!(t.broker.user("ann").is_err());
    // A refusal is shown, not swallowed: an unknown vhost.
    b.type_into("#permission-form input[name=user]", "guest")
        .await;
    b.type_into("#permission-form input[name=vhost]", "nowhere")
        .await;
    b.click("#permission-form button[type=submit]").await;
    b.wait_text("#permission-result", |t| t.contains("nowhere"))
        .await;

    // Dead letters: two rejected messages of `work` land in `work.dlq`.
    let mut dl = tern_broker::FieldTable::new();
    dl.insert(
        "x-dead-letter-exchange".into(),
        tern_broker::FieldValue::String(String::new()),
    );
    dl.insert(
        "x-dead-letter-routing-key".into(),
        tern_broker::FieldValue::String("work.dlq".into()),
    );
    let mut work = QueueDeclare::new("work");
    work.arguments = dl;
    t.broker.declare_queue("/", work, conn).await.unwrap();
    t.broker
        .declare_queue("/", QueueDeclare::new("work.dlq"), conn)
        .await
        .unwrap();
    for i in 0..2 {
        publish(&t, "work", &format!("job {i}")).await;
    }
    let mut ch = t.broker.open_channel("/", conn).unwrap();
    for _ in 0..2 {
        let got = ch.get("work", false).unwrap().unwrap();
        ch.reject(got.tag, false).unwrap();
    }
    ch.close();
    b.click("#tabs button[data-page=dead-page]").await;
    let dead_ready = "tr[data-dlq='work.dlq'] td:nth-child(3)";
    b.wait_text(dead_ready, |t| t == "2").await;
    b.wait_text("tr[data-dlq='work.dlq'] td:nth-child(5)", |t| t == "work")
        .await;
    b.screenshot("6-dead-letters").await;
    b.click("tr[data-dlq='work.dlq'] button").await;
    b.wait_text("#dead-messages", |t| {
        t.contains("job 0") && t.contains("rejected in work") && t.contains("job 1")
    })
    .await;
    b.screenshot("7-dead-letter-peek").await;
    // Browsing moved nothing.
    assert_eq!(t.broker.queue_info("/", "work.dlq").unwrap().ready, 2);

    b.type_into("#redrive input[name=rate]", "4").await;
    b.click("#redrive button").await;
    b.wait_text("#redrive-text", |t| {
        t.starts_with("completed: moved 2 of 2")
    })
    .await;
    b.wait_text(dead_ready, |t| t == "0").await;
    b.wait_text("#dead-messages", |t| t.contains("No messages"))
        .await;
    b.screenshot("8-redriven").await;
    assert_eq!(t.broker.queue_info("/", "work").unwrap().ready, 2);
    assert_eq!(t.broker.queue_info("/", "work.dlq").unwrap().ready, 0);

    // A traced flow: shop places an order, billing handles it and sends a
    // mail caused by it.
    t.broker.set_tracing(Some(tern_broker::TraceSettings {
        capacity: 100,
        sample_one_in: 1,
    }));
    let traced = |id: &str, kind: &str, app: &str, queue: &str, cause: Option<&str>| {
        let mut headers = tern_broker::FieldTable::new();
        if let Some(cause) = cause {
            headers.insert(
                "cloudEvents_causationid".into(),
                tern_broker::FieldValue::String(cause.into()),
            );
        }
        Message {
            exchange: ExchangeName::default_exchange(),
            routing_key: queue.into(),
            properties: Properties {
                correlation_id: Some("order-42".into()),
                message_id: Some(id.into()),
                kind: Some(kind.into()),
                app_id: Some(app.into()),
                headers: Some(headers),
                ..Properties::default()
            },
            body: Bytes::from_static(b"{}"),
        }
    };
    for q in ["billing", "mail"] {
        t.broker
            .declare_queue("/", QueueDeclare::new(q), conn)
            .await
            .unwrap();
    }
    t.broker
        .publish("/", traced("m1", "OrderPlaced", "shop", "billing", None))
        .unwrap()
        .confirmed()
        .await
        .unwrap();
    let mut ch = t.broker.open_channel("/", conn).unwrap();
    let got = ch.get("billing", false).unwrap().unwrap();
    ch.ack(got.tag, false).unwrap();
    t.broker
        .publish(
            "/",
            traced("m2", "InvoiceSent", "billing", "mail", Some("m1")),
        )
        .unwrap()
        .confirmed()
        .await
        .unwrap();
    ch.close();
    b.click("#tabs button[data-page=trace-page]").await;
    b.type_into("#trace input[name=correlation_id]", "order-42")
        .await;
    b.click("#trace button").await;
    b.wait_text("#trace-list", |t| {
        t.contains("OrderPlaced m1 from shop to billing: delivered, acked")
            && t.contains("InvoiceSent m2 from billing to mail, caused by m1")
    })
    .await;
    b.wait_text("#trace-status", |t| t == "2 message(s)").await;
    assert!(b.find("#trace-diagram svg path.cause").await.is_some());
    b.screenshot("9-trace").await;

    // Connections: a lapin client consuming from `mail`, closed from the page.
    let amqp = tern_amqp::AmqpServer::bind("127.0.0.1:0".parse().unwrap(), t.broker.clone())
        .await
        .unwrap();
    let client = lapin::Connection::connect(
        &format!("amqp://guest:guest@{}/%2F", amqp.local_addr()),
        lapin::ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let amqp_ch = client.create_channel().await.unwrap();
    let _consumer = amqp_ch
        .basic_consume(
            "mail".into(),
            "mailer".into(),
            lapin::options::BasicConsumeOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    b.click("#tabs button[data-page=conn-page]").await;
    // With the bytes it sent and received, and their rates.
    b.wait_text("#connections tbody", |t| {
        t.contains("AMQP 0-9-1") && t.contains("B (") && t.contains("B/s)")
    })
    .await;
    b.wait_text("#consumers tbody", |t| {
        t.contains("mailer") && t.contains("manual")
    })
    .await;
    b.screenshot("10-connections").await;
    b.click("#connections tbody button").await;
    b.call("POST", "/alert/text", json!({"text": "maintenance"}))
        .await;
    b.call("POST", "/alert/accept", json!({})).await;
    wait_for("the client to be closed", || async {
        !client.status().connected()
    })
    .await;
    b.wait_text("#connections tbody", |t| t.is_empty()).await;
    b.screenshot("11-connection-closed").await;
    amqp.shutdown().await;

    b.close().await;
}
