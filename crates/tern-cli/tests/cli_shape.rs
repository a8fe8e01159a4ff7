//! The operator commands' shape, run as the real binary against a real
//! `tern serve` on free ports: one `--url` (or `TERN_URL`) that is either
//! the AMQP URL or the management API's, with a hint when a command needs
//! the other kind; `tern publish EXCHANGE ROUTING_KEY [BODY|-]`; one summary
//! line for a bulk publish without a terminal; and `tern KIND list` as the
//! same listing as `tern list KIND`; and the progress bars on a terminal.

#![allow(clippy::unwrap_used)] // a test that fails should panic

mod support;

use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{run, stderr, stdout, tern, Serve};

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

    /// `tern ARGS --url URL`.
    fn with_url(&self, url: &str, args: &[&str], stdin: &[u8]) -> Output {
        let mut all = args.to_vec();
        all.extend(["--url", url]);
        run(&all, &[], stdin)
    }

    /// `tern ARGS --url HTTP_URL`, which must succeed; its stdout.
    fn http(&self, args: &[&str]) -> String {
        ok(&self.with_url(&self.serve.api_url(), args, b""), args)
    }

    /// `tern ARGS --url AMQP_URL`, which must succeed; its stdout.
    fn amqp(&self, args: &[&str], stdin: &[u8]) -> String {
        ok(&self.with_url(&self.serve.amqp_url(), args, stdin), args)
    }

    /// The bodies in `queue`, read without taking them (`tern dlq list`
    /// works on any queue).
    fn bodies(&self, queue: &str) -> Vec<String> {
        let text = self.amqp(&["dlq", "list", queue, "--json"], b"");
        text.lines()
            .map(|l| {
                let m: Value = serde_json::from_str(l).unwrap();
                m["body"].as_str().unwrap().to_string()
            })
            .collect()
    }

    fn list_json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        serde_json::from_str(&self.http(&all)).unwrap()
    }
}

fn ok(out: &Output, args: &[&str]) -> String {
    assert_eq!(
        out.status.code(),
        Some(0),
        "tern {args:?}: {}{}",
        stdout(out),
        stderr(out)
    );
    stdout(out)
}

fn failed(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(1), "{}", stdout(out));
    stderr(out)
}

#[test]
fn one_url_reaches_either_protocol_and_the_wrong_kind_is_explained() {
    let b = Broker::start();
    let http = b.serve.api_url();
    let amqp = b.serve.amqp_url();

    // An http:// URL serves the HTTP commands…
    b.http(&["declare", "queue", "jobs"]);
    assert!(b.http(&["users", "list"]).contains("guest"));
    // …and an amqp:// one the AMQP commands.
    b.amqp(&["publish", "", "jobs", "one"], b"");
    assert_eq!(b.bodies("jobs"), ["one"]);

    // TERN_URL is the same thing from the environment.
    let out = run(&["queues", "list"], &[("TERN_URL", &http)], b"");
    assert!(ok(&out, &["queues", "list"]).contains("jobs"));
    let out = run(&["publish", "", "jobs", "two"], &[("TERN_URL", &amqp)], b"");
    ok(&out, &["publish"]);
    assert_eq!(b.bodies("jobs"), ["one", "two"]);

    // The wrong kind says which kind the command needs, and where to find
    // it, without the password.
    let secret_amqp = format!("amqp://guest:s3cret@{}/%2f", b.serve.addr);
    let err = failed(&b.with_url(&secret_amqp, &["queues", "list"], b""));
    assert!(err.contains("management HTTP API"), "{err}");
    assert!(err.contains("http://USER:PASS@HOST:15672"), "{err}");
    assert!(err.contains("HTTP listening on"), "{err}");
    assert!(!err.contains("s3cret"), "{err}");
    let secret_http = format!("http://guest:s3cret@{}", b.serve.http);
    let err = failed(&b.with_url(&secret_http, &["publish", "", "jobs", "x"], b""));
    assert!(err.contains("speaks AMQP"), "{err}");
    assert!(err.contains("AMQP listening on"), "{err}");
    assert!(!err.contains("s3cret"), "{err}");
    let err = failed(&b.with_url(&secret_http, &["dlq", "list", "jobs"], b""));
    assert!(err.contains("speaks AMQP"), "{err}");
    let err = failed(&b.with_url("ftp://h", &["users", "list"], b""));
    assert!(err.contains("neither an AMQP URL"), "{err}");

    // The --api alias (TERN_API_URL) beside an AMQP TERN_URL: each command
    // finds its own.
    let env = [("TERN_URL", amqp.as_str()), ("TERN_API_URL", http.as_str())];
    ok(
        &run(&["publish", "", "jobs", "three"], &env, b""),
        &["publish"],
    );
    let out = run(&["queues", "list", "--json"], &env, b"");
    let queues: Value = serde_json::from_str(&ok(&out, &["queues", "list"])).unwrap();
    assert_eq!(queues[0]["name"], "jobs");
    assert_eq!(queues[0]["messages_ready"], 3);
}

#[test]
fn publish_takes_exchange_routing_key_and_body_as_arguments() {
    let b = Broker::start();
    b.http(&["declare", "exchange", "orders", "--type", "topic"]);
    b.http(&["declare", "queue", "created"]);
    b.http(&[
        "declare",
        "binding",
        "--source",
        "orders",
        "--destination",
        "created",
        "-k",
        "order.*",
    ]);
    let out = b.amqp(&["publish", "orders", "order.created", "{\"id\":1}"], b"");
    assert!(
        out.contains("confirmed: 8 bytes published to exchange \"orders\" with routing key \"order.created\""),
        "{out}"
    );
    // `-` and no body both read stdin.
    b.amqp(&["publish", "orders", "order.paid", "-"], b"from stdin");
    b.amqp(&["publish", "orders", "order.sent"], b"piped");
    // The flags still work, with the body as the only positional.
    b.amqp(
        &["publish", "-e", "orders", "-k", "order.x", "flagged"],
        b"",
    );
    assert_eq!(
        b.bodies("created"),
        ["{\"id\":1}", "from stdin", "piped", "flagged"]
    );

    // A lone argument is not enough to know where to send it.
    let err = failed(&b.with_url(&b.serve.amqp_url(), &["publish", "hello"], b""));
    assert!(err.contains("EXCHANGE ROUTING_KEY [BODY|-]"), "{err}");
    let err = failed(&b.with_url(
        &b.serve.amqp_url(),
        &["publish", "-k", "created", "a", "b"],
        b"",
    ));
    assert!(
        err.contains("only positional argument is the body"),
        "{err}"
    );
    // Unroutable keeps its exit code with positionals too.
    let out = b.with_url(
        &b.serve.amqp_url(),
        &["publish", "orders", "nothing", "x"],
        b"",
    );
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
}

#[test]
fn a_bulk_publish_without_a_terminal_prints_one_summary_line_and_no_bar() {
    let b = Broker::start();
    b.http(&["declare", "queue", "load"]);
    let out = b.with_url(
        &b.serve.amqp_url(),
        &["publish", "", "load", "x", "--count", "200"],
        b"",
    );
    let text = ok(&out, &["publish", "--count"]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "{text}");
    assert!(
        lines[0].starts_with("published 200 messages of 1 bytes")
            && lines[0].contains("200 confirmed, 0 returned as unroutable, 0 nacked"),
        "{text}"
    );
    // No progress bar (nor its escape sequences) where no one watches.
    assert_eq!(stderr(&out), "");
    let queues = b.list_json(&["queues", "list"]);
    assert_eq!(queues[0]["messages_ready"], 200);
}

#[test]
fn kind_list_commands_are_the_same_listing_as_list_kind() {
    let b = Broker::start();
    b.http(&["declare", "exchange", "events", "--type", "fanout"]);
    b.http(&["declare", "queue", "audit"]);
    b.http(&[
        "declare",
        "binding",
        "--source",
        "events",
        "--destination",
        "audit",
    ]);
    // A tail holds a connection and a consumer, so those lists have rows.
    let amqp = b.serve.amqp_url();
    let mut tail = tern(&["tail", "events", "--exchange", "--url", &amqp], &[])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while b
        .list_json(&["consumers", "list"])
        .as_array()
        .unwrap()
        .is_empty()
    {
        assert!(Instant::now() < deadline, "tail never consumed");
        std::thread::sleep(Duration::from_millis(50));
    }
    for kind in [
        "queues",
        "exchanges",
        "bindings",
        "connections",
        "consumers",
    ] {
        let new = b.list_json(&[kind, "list"]);
        let old = b.list_json(&["list", kind]);
        assert!(!new.as_array().unwrap().is_empty(), "{kind}: {new}");
        assert_eq!(
            new.as_array().unwrap().len(),
            old.as_array().unwrap().len(),
            "{kind}"
        );
        let table = b.http(&[kind, "list"]);
        assert_eq!(
            table.lines().next(),
            b.http(&["list", kind]).lines().next(),
            "{kind}: the same columns"
        );
    }
    // Aligned columns, and the filters of `tern list`.
    let table = b.http(&["queues", "list", "--name", "aud", "--vhost", "/"]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("vhost  name   type"), "{table}");
    assert!(lines[1].starts_with("/      audit  classic"), "{table}");
    let rows = lines.iter().filter(|l| !l.starts_with("vhost")).count();
    assert!(lines.iter().all(|l| !l.contains("amq.gen")), "{table}");
    assert_eq!(rows, 1, "{table}");
    let table = b.http(&["bindings", "list", "--name", "events"]);
    assert!(table.contains("events  audit"), "{table}");
    tail.kill().unwrap();
    tail.wait().unwrap();
}

/// `tern ARGS` under `script`, which gives it a terminal; its output
/// (stdout and stderr together, as the terminal shows them), or `None`
/// where util-linux's `script` is missing.
fn on_a_terminal(args: &[&str]) -> Option<String> {
    if std::process::Command::new("script")
        .arg("--version")
        .output()
        .is_err()
    {
        return None;
    }
    let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
    let line = format!("'{}' {}", support::TERN, quoted.join(" "));
    let out = std::process::Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .env_remove("TERN_URL")
        .env_remove("TERN_API_URL")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "tern {args:?} on a terminal: {text}");
    Some(text)
}

#[test]
fn bulk_sends_and_redrives_draw_a_progress_bar_on_a_terminal() {
    let b = Broker::start();
    b.http(&["declare", "queue", "load"]);
    b.http(&["declare", "queue", "back"]);
    let url = b.serve.amqp_url();
    let publish = [
        "publish", "", "load", "x", "--count", "300", "--rate", "1000", "--url", &url,
    ];
    let Some(text) = on_a_terminal(&publish) else {
        println!("skipped: no `script` (util-linux) to give tern a terminal");
        return;
    };
    assert!(text.contains("publishing ["), "{text}");
    assert!(text.contains("/300 ("), "{text}");
    assert!(text.contains("published 300 messages"), "{text}");
    let redrive = [
        "dlq",
        "redrive",
        "load",
        "--to",
        "",
        "--routing-key",
        "back",
        "--rate",
        "1000/s",
        "--url",
        &url,
    ];
    let text = on_a_terminal(&redrive).unwrap();
    assert!(text.contains("redriving ["), "{text}");
    assert!(text.contains("moved 300 messages"), "{text}");
    // The bar replaces the per-message lines.
    assert!(!text.contains("redriven 1/300"), "{text}");
    let queues = b.list_json(&["queues", "list", "--name", "back"]);
    assert_eq!(queues[0]["messages_ready"], 300);
}
