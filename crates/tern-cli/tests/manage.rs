//! The topology commands run as the real binary against a real `tern
//! serve`: `declare`, `list`, `purge` and `delete` through the management
//! API, `publish --count` through AMQP, and the errors for a missing
//! queue, wrong credentials and an API that is not there.

#![allow(clippy::unwrap_used)] // a test that fails should panic

mod support;

use serde_json::Value;
use support::{run, stderr, stdout, Serve};

struct Broker {
    serve: Serve,
    _dir: tempfile::TempDir,
}

impl Broker {
    fn start() -> Broker {
        let dir = tempfile::tempdir().unwrap();
        let serve = Serve::start(&dir.path().join("data"));
        Broker { serve, _dir: dir }
    }

    /// `tern ARGS --api URL`, which must succeed; its stdout.
    fn api(&self, args: &[&str]) -> String {
        let out = self.api_output(args);
        assert!(
            out.status.success(),
            "tern {args:?} failed: {}",
            stderr(&out)
        );
        stdout(&out)
    }

    fn api_output(&self, args: &[&str]) -> std::process::Output {
        let url = self.serve.api_url();
        let mut all = args.to_vec();
        all.extend(["--api", url.as_str()]);
        run(&all, &[], b"")
    }

    /// `tern ARGS --url URL` (AMQP).
    fn amqp(&self, args: &[&str]) -> std::process::Output {
        let url = self.serve.amqp_url();
        let mut all = args.to_vec();
        all.extend(["--url", url.as_str()]);
        run(&all, &[], b"")
    }

    fn queues_json(&self) -> Vec<Value> {
        let text = self.api(&["list", "queues", "--json"]);
        serde_json::from_str::<Value>(&text)
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }
}

#[test]
fn declare_publish_list_purge_and_delete_a_topology() {
    let b = Broker::start();

    let out = b.api(&["declare", "exchange", "orders", "--type", "topic"]);
    assert!(
        out.starts_with("declared: topic exchange \"orders\""),
        "{out}"
    );
    let out = b.api(&["declare", "exchange", "orders", "--type", "topic"]);
    assert!(
        out.starts_with("exists:"),
        "declaring again is idempotent: {out}"
    );

    let out = b.api(&["declare", "queue", "billing", "--arg", "x-max-length=10"]);
    assert!(out.starts_with("declared: queue \"billing\""), "{out}");
    let out = b.api(&[
        "declare",
        "binding",
        "--source",
        "orders",
        "--destination",
        "billing",
        "-k",
        "order.*",
    ]);
    assert!(out.starts_with("bound:"), "{out}");

    let out = b.amqp(&[
        "publish",
        "-e",
        "orders",
        "-k",
        "order.created",
        "--count",
        "25",
        "--rate",
        "2000",
        "hello",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report = stdout(&out);
    assert!(
        report.contains("published 25 messages") && report.contains("25 confirmed"),
        "{report}"
    );

    // x-max-length=10 reached the broker as a number: the queue holds ten.
    let billing = b
        .queues_json()
        .into_iter()
        .find(|q| q["name"] == "billing")
        .unwrap();
    assert_eq!(billing["messages_ready"], 10, "{billing}");
    assert_eq!(billing["arguments"]["x-max-length"], 10, "{billing}");

    let table = b.api(&["list", "queues"]);
    let header = table.lines().next().unwrap();
    assert!(header.starts_with("vhost"), "{table}");
    let row = table.lines().find(|l| l.contains("billing")).unwrap();
    assert!(row.split_whitespace().any(|c| c == "10"), "{table}");

    let bindings = b.api(&["list", "bindings", "--name", "orders"]);
    assert!(
        bindings
            .lines()
            .any(|l| l.contains("orders") && l.contains("billing") && l.contains("order.*")),
        "{bindings}"
    );

    let out = b.api(&["purge", "billing"]);
    assert!(out.starts_with("purged:"), "{out}");
    let billing = b
        .queues_json()
        .into_iter()
        .find(|q| q["name"] == "billing")
        .unwrap();
    assert_eq!(billing["messages_ready"], 0);

    let out = b.api(&[
        "delete",
        "binding",
        "--source",
        "orders",
        "--destination",
        "billing",
        "-k",
        "order.*",
    ]);
    assert!(out.starts_with("unbound:"), "{out}");
    let out = b.amqp(&["publish", "-e", "orders", "-k", "order.created", "x"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "unbound: returned as unroutable"
    );

    b.api(&["delete", "queue", "billing"]);
    b.api(&["delete", "exchange", "orders"]);
    assert!(b.queues_json().iter().all(|q| q["name"] != "billing"));
    let exchanges = b.api(&["list", "exchanges"]);
    assert!(!exchanges.contains("orders"), "{exchanges}");
    assert!(exchanges.contains("amq.topic"), "{exchanges}");
}

#[test]
fn lists_show_open_connections_and_filter_by_vhost() {
    let b = Broker::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let conn = rt
        .block_on(lapin::Connection::connect(
            &b.serve.amqp_url(),
            lapin::ConnectionProperties::default(),
        ))
        .unwrap();
    let connections = b.api(&["list", "connections"]);
    assert!(
        connections.lines().any(|l| l.contains("guest")),
        "{connections}"
    );
    let vhosts = b.api(&["list", "vhosts"]);
    assert!(vhosts.lines().any(|l| l.starts_with('/')), "{vhosts}");
    let none = b.api(&["list", "queues", "--vhost", "no-such-vhost"]);
    assert!(none.ends_with("(none)\n"), "{none}");
    drop(conn);
}

#[test]
fn errors_name_the_problem_and_the_fix() {
    let b = Broker::start();

    let out = b.api_output(&["delete", "queue", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("404") && err.contains("nope"), "{err}");

    let bad = format!("http://guest:wrong@{}", b.serve.http);
    let out = run(&["list", "queues", "--api", &bad], &[], b"");
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("401") && err.contains("check the user and password"),
        "{err}"
    );
    assert!(!err.contains("wrong"), "the password is not echoed: {err}");

    let out = b.api_output(&["declare", "queue", "q", "--arg", "novalue"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("KEY=VALUE"), "{}", stderr(&out));

    let out = b.amqp(&["publish", "--count", "0", "x"]);
    assert_eq!(out.status.code(), Some(2), "clap refuses a zero count");

    // An address nothing listens on (the port of a socket just closed).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let gone = format!("http://guest:guest@127.0.0.1:{port}");
    let out = run(&["list", "queues", "--api", &gone], &[], b"");
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("is `tern serve` running"), "{err}");
}

#[test]
fn a_super_stream_is_declared_published_to_and_deleted_with_its_partitions() {
    let b = Broker::start();
    let out = b.api(&[
        "declare",
        "exchange",
        "events",
        "--type",
        "x-super-stream",
        "--arg",
        "x-partitions=3",
    ]);
    assert!(out.starts_with("declared:"), "{out}");
    let names = |b: &Broker| -> Vec<String> {
        let mut n: Vec<String> = b
            .queues_json()
            .iter()
            .filter_map(|q| q["name"].as_str().map(str::to_string))
            .filter(|n| n.starts_with("events-"))
            .collect();
        n.sort();
        n
    };
    assert_eq!(names(&b), ["events-0", "events-1", "events-2"]);
    // Each message goes to exactly one partition.
    let out = b.amqp(&["publish", "-e", "events", "-k", "customer-1", "hello"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let total: u64 = b
        .queues_json()
        .iter()
        .filter(|q| q["name"].as_str().is_some_and(|n| n.starts_with("events-")))
        .map(|q| q["messages_ready"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 1);
    b.api(&["delete", "exchange", "events"]);
    assert!(names(&b).is_empty());
}
