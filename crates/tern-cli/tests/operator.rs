//! The operator commands run as the real binary against a real `tern
//! serve` on free ports: `publish` (confirmed, returned, stdin, headers and
//! properties, exit codes), `tail` (an exchange through a temporary queue,
//! JSON and base64 output, a queue only with `--consume`), `dlq list`
//! (nothing removed), `dlq show` (one message in full, by position or
//! message id, nothing removed) and `dlq redrive` (broker and toolkit dead
//! letters, `--to`, `--limit`, and killed again and again then re-run:
//! none lost, none duplicated), and the errors for a
//! broker that is not there and a queue that does not exist.

#![allow(clippy::unwrap_used)] // a test that fails should panic

mod support;

use std::collections::BTreeSet;
use std::io::Read;
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use support::{run, stderr, stdout, tern, Serve};

struct Broker {
    serve: Serve,
    _dir: tempfile::TempDir,
    conn: Connection,
    ch: Channel,
}

async fn broker() -> Broker {
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(&dir.path().join("data"));
    let conn = Connection::connect(&serve.amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    Broker {
        serve,
        _dir: dir,
        conn,
        ch,
    }
}

impl Broker {
    fn url(&self) -> String {
        self.serve.amqp_url()
    }

    /// `tern ARGS --url URL` to the end, in a blocking thread.
    async fn tern(&self, args: &[&str], stdin: &[u8]) -> std::process::Output {
        let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        all.push("--url".into());
        all.push(self.url());
        let stdin = stdin.to_vec();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = all.iter().map(String::as_str).collect();
            run(&args, &[], &stdin)
        })
        .await
        .unwrap()
    }

    async fn queue(&self, name: &str, arguments: FieldTable) {
        self.ch
            .queue_declare(name.into(), QueueDeclareOptions::durable(), arguments)
            .await
            .unwrap();
    }

    async fn exchange(&self, name: &str, kind: ExchangeKind) {
        self.ch
            .exchange_declare(
                name.into(),
                kind,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
    }

    async fn bind(&self, queue: &str, exchange: &str, key: &str) {
        self.ch
            .queue_bind(
                queue.into(),
                exchange.into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
    }

    async fn publish(&self, exchange: &str, key: &str, body: &[u8], props: BasicProperties) {
        let confirm = self
            .ch
            .basic_publish(
                exchange.into(),
                key.into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert_eq!(confirm, Confirmation::Ack(None));
    }

    async fn depth(&self, queue: &str) -> u32 {
        self.ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap()
            .message_count()
    }

    /// Takes every message of `queue`.
    async fn drain(&self, queue: &str) -> Vec<lapin::message::Delivery> {
        let mut got = Vec::new();
        while let Some(m) = self
            .ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            got.push(m.delivery);
        }
        got
    }

    async fn stop(mut self) {
        self.conn.close(200, "bye".into()).await.unwrap();
        assert_eq!(self.serve.stop(), Some(0));
    }
}

fn header<'a>(d: &'a lapin::message::Delivery, key: &str) -> Option<&'a AMQPValue> {
    d.properties.headers().as_ref()?.inner().get(key)
}

fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_reports_confirmed_and_returned_with_distinct_exit_codes() {
    let b = broker().await;
    b.queue("q", FieldTable::default()).await;

    let out = b
        .tern(
            &[
                "publish",
                "--routing-key",
                "q",
                "--header",
                "tenant=acme",
                "-H",
                "trace=a=b",
                "--content-type",
                "text/plain",
                "--persistent",
                "hello",
            ],
            b"",
        )
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("confirmed: 5 bytes"),
        "{}",
        stdout(&out)
    );
    // The body from stdin.
    let out = b
        .tern(&["publish", "-k", "q", "-"], b"from\nstdin\xff")
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    let got = b.drain("q").await;
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].data, b"hello");
    assert_eq!(header(&got[0], "tenant"), Some(&long_string("acme")));
    assert_eq!(header(&got[0], "trace"), Some(&long_string("a=b")));
    assert_eq!(
        got[0]
            .properties
            .content_type()
            .as_ref()
            .map(|s| s.as_str()),
        Some("text/plain")
    );
    assert_eq!(got[0].properties.delivery_mode(), &Some(2));
    assert_eq!(got[1].data, b"from\nstdin\xff");
    assert_eq!(
        got[1].properties.delivery_mode(),
        &None,
        "transient unless --persistent"
    );

    // Unroutable: returned, exit 3, and nothing arrives anywhere.
    let out = b.tern(&["publish", "-k", "nowhere", "lost"], b"").await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("returned: unroutable"),
        "{}",
        stdout(&out)
    );
    // A missing exchange: exit 1 and the 404 explained.
    let out = b
        .tern(&["publish", "--exchange", "no.such", "-k", "q", "x"], b"")
        .await;
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("404") && err.contains("no.such"), "{err}");
    // A header that is not KEY=VALUE.
    let out = b
        .tern(&["publish", "-k", "q", "-H", "novalue", "x"], b"")
        .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("KEY=VALUE"), "{}", stderr(&out));
    assert_eq!(b.depth("q").await, 0);
    b.stop().await;
}

/// Starts `tern tail ARGS` and waits until it says it is bound; its stderr
/// is read to the end by a thread (a closed pipe would fail tail's writes).
async fn spawn_tail(args: &[&str]) -> (std::process::Child, std::thread::JoinHandle<String>) {
    let mut child = tern(args, &[])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = child.stderr.take().unwrap();
    let (ready_tx, ready) = tokio::sync::oneshot::channel();
    let err_text = std::thread::spawn(move || {
        let mut seen = String::new();
        let mut ready_tx = Some(ready_tx);
        let mut buf = [0u8; 256];
        loop {
            let n = err.read(&mut buf).unwrap();
            if n == 0 {
                return seen;
            }
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            if seen.contains("tailing exchange") {
                if let Some(tx) = ready_tx.take() {
                    let _ = tx.send(());
                }
            }
        }
    });
    let bound = tokio::time::timeout(Duration::from_secs(30), ready).await;
    if !matches!(bound, Ok(Ok(()))) {
        let _ = child.kill();
        let _ = child.wait();
        panic!("tail did not bind: {}", err_text.join().unwrap());
    }
    (child, err_text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_on_an_exchange_prints_matching_messages_as_json() {
    let b = broker().await;
    b.exchange("events", ExchangeKind::Topic).await;
    b.queue("keeper", FieldTable::default()).await;
    b.bind("keeper", "events", "#").await;

    let url = b.url();
    // Publish only once the temporary queue is bound.
    let (child, err_text) = spawn_tail(&[
        "tail",
        "events",
        "--exchange",
        "--binding-key",
        "order.*",
        "--count",
        "2",
        "--json",
        "--url",
        &url,
    ])
    .await;
    let props = BasicProperties::default()
        .with_headers(FieldTable::from(std::collections::BTreeMap::from([(
            "tenant".into(),
            long_string("acme"),
        )])))
        .with_content_type("application/json".into());
    b.publish("events", "order.created", br#"{"id":1}"#, props)
        .await;
    b.publish(
        "events",
        "user.created",
        b"not for tail",
        BasicProperties::default(),
    )
    .await;
    b.publish(
        "events",
        "order.paid",
        &[0xff, 0x00, 0x01],
        BasicProperties::default(),
    )
    .await;
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let err = err_text.join().unwrap();
    assert_eq!(out.status.code(), Some(0), "{err}");
    let lines: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["routing_key"], "order.created");
    assert_eq!(lines[0]["body"], r#"{"id":1}"#);
    assert_eq!(lines[0]["body_encoding"], "utf8");
    assert_eq!(lines[0]["headers"]["tenant"], "acme");
    assert_eq!(lines[0]["properties"]["content_type"], "application/json");
    assert_eq!(lines[1]["routing_key"], "order.paid");
    assert_eq!(lines[1]["body_encoding"], "base64");
    assert_eq!(lines[1]["body"], "/wAB");
    // Tailing took nothing from the exchange's own queue.
    assert_eq!(b.depth("keeper").await, 3);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_on_a_queue_needs_consume_and_then_takes_messages() {
    let b = broker().await;
    b.queue("jobs", FieldTable::default()).await;
    for i in 0..3 {
        b.publish(
            "",
            "jobs",
            format!("job {i}").as_bytes(),
            BasicProperties::default(),
        )
        .await;
    }
    let out = b.tern(&["tail", "jobs"], b"").await;
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("--consume") && err.contains("--exchange"),
        "{err}"
    );
    assert_eq!(b.depth("jobs").await, 3, "the refusal took nothing");

    let out = b
        .tern(&["tail", "jobs", "--consume", "--count", "2"], b"")
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("body: job 0") && text.contains("body: job 1"),
        "{text}"
    );
    assert!(!text.contains("job 2"), "{text}");
    // Wait for the acks to settle: two taken for good, one left.
    let deadline = Instant::now() + Duration::from_secs(10);
    while b.depth("jobs").await != 1 {
        assert!(Instant::now() < deadline, "depth {}", b.depth("jobs").await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = b.tern(&["tail", "no.such.queue", "--consume"], b"").await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("404"), "{}", stderr(&out));
    b.stop().await;
}

/// `work` (bound to direct exchange `orders` with key `new`) dead-letters
/// to fanout `dlx`, which feeds `work.dlq`; `n` messages are published
/// and rejected, so `work.dlq` holds them with an `x-death` history.
async fn dead_letter(b: &Broker, n: usize) -> BTreeSet<String> {
    b.exchange("orders", ExchangeKind::Direct).await;
    b.exchange("dlx", ExchangeKind::Fanout).await;
    let mut args = FieldTable::default();
    args.insert("x-dead-letter-exchange".into(), long_string("dlx"));
    b.queue("work", args).await;
    b.bind("work", "orders", "new").await;
    b.queue("work.dlq", FieldTable::default()).await;
    b.bind("work.dlq", "dlx", "").await;
    let mut sent = BTreeSet::new();
    for i in 0..n {
        let body = format!("order {i}");
        b.publish(
            "orders",
            "new",
            body.as_bytes(),
            BasicProperties::default().with_delivery_mode(2),
        )
        .await;
        sent.insert(body);
    }
    let mut consumer =
        b.ch.basic_consume(
            "work".into(),
            "rejecter".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for _ in 0..n {
        let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        d.reject(BasicRejectOptions { requeue: false })
            .await
            .unwrap();
    }
    b.ch.basic_cancel("rejecter".into(), BasicCancelOptions::default())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while b.depth("work.dlq").await as usize != n {
        assert!(Instant::now() < deadline, "dead-lettering is too slow");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sent
}

fn bodies(got: &[lapin::message::Delivery]) -> Vec<String> {
    got.iter()
        .map(|d| String::from_utf8(d.data.clone()).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_list_shows_why_and_leaves_every_message() {
    let b = broker().await;
    dead_letter(&b, 5).await;
    let out = b
        .tern(&["dlq", "list", "work.dlq", "--limit", "3"], b"")
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("queue \"work.dlq\": 5 messages"), "{text}");
    assert_eq!(text.matches("--- message").count(), 3, "{text}");
    assert!(text.contains("\"reason\":\"rejected\""), "{text}");
    assert!(text.contains("\"queue\":\"work\""), "{text}");
    assert!(text.contains("2 more not shown"), "{text}");
    let out = b.tern(&["dlq", "list", "work.dlq", "--json"], b"").await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let lines: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5);
    assert_eq!(lines[0]["death"]["x-death"]["exchange"], "orders");
    // Listing changed nothing.
    assert_eq!(b.depth("work.dlq").await, 5);
    let out = b.tern(&["dlq", "list", "no.such.dlq"], b"").await;
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("404") && err.contains("no.such.dlq"), "{err}");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_redrive_moves_every_dead_letter_back_exactly_once() {
    let b = broker().await;
    let sent = dead_letter(&b, 30).await;
    // A limit moves that many and stops.
    let out = b
        .tern(
            &[
                "dlq", "redrive", "work.dlq", "--limit", "10", "--rate", "500/s",
            ],
            b"",
        )
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("moved 10 messages"),
        "{}",
        stdout(&out)
    );
    assert_eq!(b.depth("work.dlq").await, 20);
    // The rest, to the original exchange and key from x-death.
    let out = b.tern(&["dlq", "redrive", "work.dlq"], b"").await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("moved 20 messages"),
        "{}",
        stdout(&out)
    );
    assert!(
        stdout(&out).contains("to exchange \"orders\" with routing key \"new\""),
        "{}",
        stdout(&out)
    );
    assert_eq!(b.depth("work.dlq").await, 0);
    let got = b.drain("work").await;
    let got_bodies = bodies(&got);
    assert_eq!(got_bodies.len(), 30, "none lost, none duplicated");
    assert_eq!(got_bodies.iter().cloned().collect::<BTreeSet<_>>(), sent);
    assert!(header(&got[0], "x-death").is_some(), "the history is kept");
    assert_eq!(
        got[0].properties.delivery_mode(),
        &Some(2),
        "properties kept"
    );
    // An empty queue: nothing to do, exit 0.
    let out = b.tern(&["dlq", "redrive", "work.dlq"], b"").await;
    assert_eq!(out.status.code(), Some(0));
    assert!(
        stdout(&out).contains("moved 0 messages"),
        "{}",
        stdout(&out)
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_redrive_sends_toolkit_dead_letters_to_their_service_or_to_the_flag() {
    let b = broker().await;
    b.queue("billing", FieldTable::default()).await;
    b.queue("billing.dlq", FieldTable::default()).await;
    b.queue("elsewhere", FieldTable::default()).await;
    for i in 0..4 {
        let headers = FieldTable::from(std::collections::BTreeMap::from([
            ("tern-failed-service".into(), long_string("billing")),
            ("tern-error".into(), long_string("card declined")),
            ("tern-attempt".into(), AMQPValue::LongLongInt(5)),
            ("tenant".into(), long_string("acme")),
        ]));
        b.publish(
            "",
            "billing.dlq",
            format!("charge {i}").as_bytes(),
            BasicProperties::default().with_headers(headers),
        )
        .await;
    }
    let out = b.tern(&["dlq", "list", "billing.dlq"], b"").await;
    assert!(
        stdout(&out).contains("tern-error: card declined"),
        "{}",
        stdout(&out)
    );
    let out = b
        .tern(&["dlq", "redrive", "billing.dlq", "--limit", "3"], b"")
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let got = b.drain("billing").await;
    assert_eq!(bodies(&got), ["charge 0", "charge 1", "charge 2"]);
    for d in &got {
        assert_eq!(header(d, "tenant"), Some(&long_string("acme")));
        for gone in ["tern-failed-service", "tern-error", "tern-attempt"] {
            assert_eq!(header(d, gone), None, "{gone} is reset on redrive");
        }
    }
    // --to overrides the origin.
    let out = b
        .tern(
            &[
                "dlq",
                "redrive",
                "billing.dlq",
                "--to",
                "",
                "--routing-key",
                "elsewhere",
            ],
            b"",
        )
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(bodies(&b.drain("elsewhere").await), ["charge 3"]);
    assert_eq!(b.depth("billing.dlq").await, 0);

    // A message whose origin is unknown, or whose target routes nowhere,
    // stays where it is, and the command fails saying so.
    b.publish("", "billing.dlq", b"orphan", BasicProperties::default())
        .await;
    let out = b.tern(&["dlq", "redrive", "billing.dlq"], b"").await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--to EXCHANGE"), "{}", stderr(&out));
    let out = b
        .tern(
            &[
                "dlq",
                "redrive",
                "billing.dlq",
                "--to",
                "",
                "--routing-key",
                "void",
            ],
            b"",
        )
        .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("routes routing key \"void\" to no queue"),
        "{}",
        stderr(&out)
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while b.depth("billing.dlq").await != 1 {
        assert!(Instant::now() < deadline, "the orphan was lost");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    b.stop().await;
}

#[test]
fn a_broker_that_is_not_there_is_explained_with_the_url_redacted() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = free.local_addr().unwrap().port();
    drop(free);
    let url = format!("amqp://guest:hunter2@127.0.0.1:{port}/%2f");
    for args in [
        vec!["publish", "-k", "q", "x"],
        vec!["tail", "--exchange", "amq.topic"],
        vec!["dlq", "list", "q"],
        vec!["dlq", "redrive", "q"],
    ] {
        let mut all = args.clone();
        all.extend(["--url", &url]);
        let out = run(&all, &[], b"");
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = stderr(&out);
        assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
        assert!(!err.contains("hunter2"), "the password is redacted: {err}");
        assert!(err.contains("tern serve") && err.contains("--url"), "{err}");
    }
    // TERN_URL is read too.
    let out = run(&["dlq", "list", "q"], &[("TERN_URL", &url)], b"");
    assert!(
        stderr(&out).contains(&format!("127.0.0.1:{port}")),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_into_a_closed_pipe_ends_quietly() {
    let b = broker().await;
    b.exchange("events", ExchangeKind::Fanout).await;
    let url = b.url();
    // As in `tern tail … | head -0`: the reader is gone from the start.
    let (mut child, err_text) = spawn_tail(&["tail", "events", "--exchange", "--url", &url]).await;
    drop(child.stdout.take());
    b.publish("events", "", b"one", BasicProperties::default())
        .await;
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    let err = err_text.join().unwrap();
    assert_eq!(status.code(), Some(0), "no panic: {err}");
    assert!(!err.contains("panicked"), "{err}");
    b.stop().await;
}

/// Starts `tern ARGS` (a `dlq redrive`), waits for its first move, waits
/// `delay` more, and SIGKILLs it, wherever it is in its move; `false` if it
/// finished before moving anything.
async fn kill_redrive_midway(args: &[&str], delay: Duration) -> bool {
    let mut child = tern(args, &[])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (first_tx, first) = tokio::sync::oneshot::channel();
    // Reads on after the first move, so the child never blocks on a full
    // pipe before the kill.
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut first_tx = Some(first_tx);
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if line.starts_with("redriven ") {
                if let Some(tx) = first_tx.take() {
                    let _ = tx.send(());
                }
            }
        }
    });
    let moved = tokio::time::timeout(Duration::from_secs(30), first).await;
    let moved = matches!(moved, Ok(Ok(())));
    if moved {
        tokio::time::sleep(delay).await;
    }
    let _ = child.kill(); // SIGKILL
    child.wait().unwrap();
    reader.join().unwrap();
    moved
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redrive_killed_at_any_point_and_rerun_moves_every_message_exactly_once() {
    let b = broker().await;
    let sent = dead_letter(&b, 60).await;
    let url = b.url();
    // Paced runs, killed at staggered moments of a 25 ms move cycle, then
    // unpaced runs, where nearly all the time is spent inside a move (get,
    // publish, ack, commit), so the kills land there.
    let mut kills = 0;
    for (i, rate) in ["40/s", "40/s", "40/s", "40/s", "1000/s", "1000/s", "1000/s"]
        .iter()
        .enumerate()
    {
        let delay = Duration::from_micros(3_100 * i as u64);
        let args = ["dlq", "redrive", "work.dlq", "--url", &url, "--rate", rate];
        if kill_redrive_midway(&args, delay).await {
            kills += 1;
        }
        // The broker requeues what the killed connection held.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut total = 0;
        while total < 60 {
            assert!(Instant::now() < deadline, "messages missing after kill {i}");
            tokio::time::sleep(Duration::from_millis(20)).await;
            total = b.depth("work").await + b.depth("work.dlq").await;
        }
        assert_eq!(total, 60, "kill {i} left a message in both queues");
    }
    assert!(kills >= 5, "only {kills} runs were killed mid-way");
    let moved_before = b.depth("work").await;
    assert!(
        moved_before > 0 && moved_before < 60,
        "the kills left {moved_before} moved"
    );
    // The same command again finishes the job.
    let out = b.tern(&["dlq", "redrive", "work.dlq"], b"").await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!("moved {} messages", 60 - moved_before)),
        "{}",
        stdout(&out)
    );
    assert_eq!(b.depth("work.dlq").await, 0);
    let got = bodies(&b.drain("work").await);
    assert_eq!(got.len(), 60, "every message arrived exactly once: {got:?}");
    assert_eq!(got.into_iter().collect::<BTreeSet<_>>(), sent);
    b.stop().await;
}

/// The same kill-and-rerun against RabbitMQ (when `TERN_TEST_RABBITMQ_URL`
/// is set), whose transactions the redrive relies on just as on Tern's,
/// and an unroutable target there: the message is put back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_redrive_moves_every_message_exactly_once_on_rabbitmq_too() {
    let Ok(url) = std::env::var("TERN_TEST_RABBITMQ_URL") else {
        println!("skipped: TERN_TEST_RABBITMQ_URL is not set");
        return;
    };
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let prefix = format!("tern-cli-redrive-{}", std::process::id());
    let (src, dst) = (format!("{prefix}.dlq"), format!("{prefix}.work"));
    for q in [&src, &dst] {
        ch.queue_declare(
            q.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
    let depth = |q: String| {
        let ch = ch.clone();
        async move {
            ch.queue_declare(
                q.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap()
            .message_count()
        }
    };
    let mut sent = BTreeSet::new();
    for i in 0..40 {
        let body = format!("job {i}");
        let confirm = ch
            .basic_publish(
                "".into(),
                src.as_str().into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert_eq!(confirm, Confirmation::Ack(None));
        sent.insert(body);
    }
    let redrive = [
        "dlq",
        "redrive",
        &src,
        "--to",
        "",
        "--routing-key",
        &dst,
        "--url",
        &url,
    ];
    for (i, rate) in ["40/s", "1000/s", "1000/s"].iter().enumerate() {
        let mut args = redrive.to_vec();
        args.extend(["--rate", rate]);
        kill_redrive_midway(&args, Duration::from_micros(2_900 * i as u64)).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut total = 0;
        while total < 40 {
            assert!(Instant::now() < deadline, "messages missing after kill {i}");
            tokio::time::sleep(Duration::from_millis(20)).await;
            total = depth(src.clone()).await + depth(dst.clone()).await;
        }
        assert_eq!(total, 40, "kill {i} left a message in both queues");
    }
    let out = tokio::task::spawn_blocking({
        let args: Vec<String> = redrive.iter().map(|s| s.to_string()).collect();
        move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run(&args, &[], b"")
        }
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(depth(src.clone()).await, 0);
    let mut got = Vec::new();
    while let Some(m) = ch
        .basic_get(dst.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        got.push(String::from_utf8(m.delivery.data).unwrap());
    }
    assert_eq!(got.len(), 40, "every message arrived exactly once");
    assert_eq!(got.into_iter().collect::<BTreeSet<_>>(), sent);

    // Unroutable: the original goes back to the queue, and the run fails.
    ch.basic_publish(
        "".into(),
        src.as_str().into(),
        BasicPublishOptions::default(),
        b"stray",
        BasicProperties::default(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let nowhere = format!("{prefix}.nowhere");
    let args = [
        "dlq",
        "redrive",
        &src,
        "--to",
        "",
        "--routing-key",
        &nowhere,
        "--url",
        &url,
    ];
    let out = tokio::task::spawn_blocking({
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run(&args, &[], b"")
        }
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("put back"), "{}", stderr(&out));
    assert_eq!(depth(src.clone()).await, 1);
    for q in [&src, &dst] {
        ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await
            .unwrap();
    }
    conn.close(200, "bye".into()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_show_prints_one_message_in_full_and_leaves_it() {
    let b = broker().await;
    dead_letter(&b, 2).await;
    b.queue("raw.dlq", FieldTable::default()).await;
    let headers = FieldTable::from(std::collections::BTreeMap::from([(
        "tenant".into(),
        long_string("acme"),
    )]));
    b.publish(
        "",
        "raw.dlq",
        b"{\"order\":7,\"items\":[1,2]}",
        BasicProperties::default()
            .with_message_id("m-1".into())
            .with_content_type("application/json".into())
            .with_headers(headers),
    )
    .await;
    b.publish(
        "",
        "raw.dlq",
        b"\xff\x00binary",
        BasicProperties::default().with_message_id("m-2".into()),
    )
    .await;

    // By position (the head by default), with the deaths decoded.
    let out = b
        .tern(&["dlq", "show", "work.dlq", "--position", "2"], b"")
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.starts_with("message 2 of queue \"work.dlq\""),
        "{text}"
    );
    assert!(
        text.contains("death 1 of 1: rejected in queue work at 20")
            && text.contains("from exchange orders with routing keys [\"new\"]"),
        "{text}"
    );
    assert!(text.contains("body (7 bytes):\norder 1\n"), "{text}");

    // By message id, with properties, headers and a pretty JSON body.
    let out = b
        .tern(&["dlq", "show", "raw.dlq", "--message-id", "m-1"], b"")
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("  message_id: \"m-1\"\n"), "{text}");
    assert!(
        text.contains("  content_type: \"application/json\"\n"),
        "{text}"
    );
    assert!(text.contains("  tenant: \"acme\"\n"), "{text}");
    assert!(text.contains("deaths: none recorded"), "{text}");
    assert!(
        text.contains(
            "body (JSON, 25 bytes):\n{\n  \"items\": [\n    1,\n    2\n  ],\n  \"order\": 7\n}\n"
        ),
        "{text}"
    );
    let out = b
        .tern(
            &["dlq", "show", "raw.dlq", "--message-id", "m-2", "--json"],
            b"",
        )
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let m: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(m["position"], 2);
    assert_eq!(m["body_encoding"], "base64");
    assert_eq!(m["deaths"], serde_json::json!([]));

    // Nothing there: the error says what there is.
    let out = b
        .tern(&["dlq", "show", "raw.dlq", "--position", "3"], b"")
        .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("holds 2 messages"),
        "{}",
        stderr(&out)
    );
    let out = b
        .tern(&["dlq", "show", "raw.dlq", "--message-id", "nope"], b"")
        .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no message with message-id \"nope\""));

    // Showing took nothing, and kept the order.
    assert_eq!(b.depth("work.dlq").await, 2);
    assert_eq!(bodies(&b.drain("work.dlq").await), ["order 0", "order 1"]);
    assert_eq!(b.depth("raw.dlq").await, 2);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_stops_on_sigint_with_exit_0() {
    let b = broker().await;
    b.exchange("events", ExchangeKind::Fanout).await;
    let url = b.url();
    let (mut child, err_text) = spawn_tail(&["tail", "events", "--exchange", "--url", &url]).await;
    let status = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    let err = err_text.join().unwrap();
    assert_eq!(status.code(), Some(0), "{err}");
    b.stop().await;
}
