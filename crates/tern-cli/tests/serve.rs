//! `tern serve` run as a real process: it listens where it is told and
//! prints the addresses, answers AMQP and the HTTP API, shuts down cleanly
//! on SIGTERM and SIGINT, refuses a taken port, a data directory that is a
//! file or in use, and keeps every confirmed message across SIGKILLs.

#![allow(clippy::unwrap_used)] // a test helper that fails should panic

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};

const TERN: &str = env!("CARGO_BIN_EXE_tern");

/// A running `tern serve`, killed if the test ends without stopping it.
struct Serve {
    child: Child,
    addr: SocketAddr,
    http: SocketAddr,
    stderr: Arc<Mutex<String>>,
}

/// Starts `tern` with `args` and the environment `env`, with stdout and
/// stderr captured by threads (so that logging never blocks on a full pipe).
/// The HTTP API goes to a free port unless `env` or `args` say otherwise
/// (15672 may be RabbitMQ's here).
fn spawn(
    args: &[&str],
    env: &[(&str, &str)],
) -> (Child, mpsc::Receiver<String>, Arc<Mutex<String>>) {
    let mut cmd = Command::new(TERN);
    cmd.args(args)
        .env_remove("TERN_DATA_DIR")
        .env_remove("TERN_AMQP_ADDR")
        .env_remove("TERN_HTTP_TOKEN")
        .env_remove("TERN_CONFIG")
        .env_remove("TERN_LOG_FORMAT")
        .env_remove("TERN_LOG_LEVEL")
        .env("TERN_HTTP_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let (lines_tx, lines) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = lines_tx.send(line);
        }
    });
    let stderr = Arc::new(Mutex::new(String::new()));
    let mut pipe = child.stderr.take().unwrap();
    let sink = Arc::clone(&stderr);
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    (child, lines, stderr)
}

impl Serve {
    /// Starts `tern serve` on `data_dir` and a free port, and waits for the
    /// line that announces the address.
    fn start(data_dir: &Path) -> Serve {
        let dir = data_dir.to_str().unwrap();
        Serve::start_with(
            &["serve", "--data-dir", dir, "--amqp-addr", "127.0.0.1:0"],
            &[],
        )
    }

    fn start_with(args: &[&str], env: &[(&str, &str)]) -> Serve {
        let (mut child, lines, stderr) = spawn(args, env);
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut amqp = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(addr) = line.strip_prefix("tern: AMQP listening on ") {
                        amqp = Some(addr.trim().parse().unwrap());
                    }
                    if let Some(addr) = line.strip_prefix("tern: HTTP listening on ") {
                        return Serve {
                            child,
                            addr: amqp.expect("the AMQP line comes first"),
                            http: addr.trim().parse().unwrap(),
                            stderr,
                        };
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let status = child.wait().unwrap();
                    panic!(
                        "no listening line from tern serve ({status}); stderr:\n{}",
                        stderr.lock().unwrap()
                    );
                }
            }
        }
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits for the process to exit, at most `timeout`.
    fn wait(&mut self, timeout: Duration) -> ExitStatus {
        wait_exit(&mut self.child, timeout, &self.stderr)
    }

    fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_exit(child: &mut Child, timeout: Duration, stderr: &Mutex<String>) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            // Let the reader thread take the last of stderr.
            thread::sleep(Duration::from_millis(100));
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "tern did not exit within {timeout:?}; stderr:\n{}",
                stderr.lock().unwrap()
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `tern` expecting it to fail at start-up; returns its stderr.
fn run_failing(args: &[&str], env: &[(&str, &str)]) -> String {
    let (mut child, lines, stderr) = spawn(args, env);
    let status = wait_exit(&mut child, Duration::from_secs(30), &stderr);
    let out: Vec<String> = lines.try_iter().collect();
    let err = stderr.lock().unwrap().clone();
    assert!(
        !status.success(),
        "tern should have failed; stdout: {out:?}; stderr:\n{err}"
    );
    assert!(
        !out.iter().any(|l| l.contains("listening")),
        "tern failed but announced a listener: {out:?}"
    );
    err
}

/// Sends the AMQP 0-9-1 protocol header and expects a method frame on
/// channel 0 back (connection.start: class 10, method 10).
fn assert_speaks_amqp(addr: SocketAddr) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"AMQP\x00\x00\x09\x01").unwrap();
    let mut head = [0u8; 11];
    s.read_exact(&mut head).unwrap();
    assert_eq!(head[0], 1, "a method frame");
    assert_eq!(&head[1..3], &[0, 0], "on channel 0");
    assert_eq!(&head[7..11], &[0, 10, 0, 10], "connection.start");
}

#[test]
fn serve_answers_amqp_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut serve = Serve::start(&dir.path().join("data"));
    assert_eq!(serve.addr.ip().to_string(), "127.0.0.1");
    assert_ne!(
        serve.addr.port(),
        0,
        "port 0 is replaced by the chosen port"
    );
    assert_speaks_amqp(serve.addr);
    // A connection still open at shutdown does not hold it up.
    let _idle = TcpStream::connect(serve.addr).unwrap();
    serve.signal("TERM");
    let status = serve.wait(Duration::from_secs(10));
    assert_eq!(
        status.code(),
        Some(0),
        "stderr:\n{}",
        serve.stderr.lock().unwrap()
    );
    assert!(
        TcpStream::connect(serve.addr).is_err(),
        "no longer listening"
    );
    // The data directory was released: it opens again.
    let mut again = Serve::start(&dir.path().join("data"));
    again.signal("INT");
    assert_eq!(again.wait(Duration::from_secs(10)).code(), Some(0));
}

#[test]
fn a_taken_port_names_the_address_and_the_flag() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let err = run_failing(&["serve", "--data-dir", data, "--amqp-addr", &addr], &[]);
    assert!(err.contains(&addr), "names {addr}: {err}");
    assert!(err.contains("already in use"), "{err}");
    assert!(
        err.contains("--amqp-addr") && err.contains("TERN_AMQP_ADDR"),
        "{err}"
    );
    // Through the environment too.
    let err = run_failing(&["serve", "--data-dir", data], &[("TERN_AMQP_ADDR", &addr)]);
    assert!(err.contains(&addr), "names {addr}: {err}");
}

/// One HTTP/1.1 request over a fresh connection; the status and the body.
fn http(addr: SocketAddr, method: &str, path: &str, auth: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {auth}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    let status = reply
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {reply:?}"));
    let body = reply
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// `Basic base64("guest:guest")`.
const GUEST: &str = "Basic Z3Vlc3Q6Z3Vlc3Q=";

#[test]
fn serve_answers_the_http_api_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut serve = Serve::start_with(
        &[
            "serve",
            "--data-dir",
            data.to_str().unwrap(),
            "--amqp-addr",
            "127.0.0.1:0",
        ],
        &[("TERN_HTTP_TOKEN", "s3cret")],
    );
    assert_eq!(serve.http.ip().to_string(), "127.0.0.1");
    assert_ne!(serve.http.port(), 0);
    let (status, body) = http(serve.http, "GET", "/api/overview", GUEST, "");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("tern_version"), "{body}");
    let (status, _) = http(serve.http, "GET", "/api/overview", "Bearer s3cret", "");
    assert_eq!(status, 200);
    let (status, _) = http(serve.http, "GET", "/api/overview", "Bearer wrong", "");
    assert_eq!(status, 401);

    let (status, body) = http(serve.http, "PUT", "/api/queues/%2F/q", GUEST, "{}");
    assert_eq!(status, 201, "{body}");
    let publish = r#"{"routing_key":"q","payload":"hi"}"#;
    let (status, body) = http(
        serve.http,
        "POST",
        "/api/exchanges/%2F/amq.default/publish",
        GUEST,
        publish,
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""routed":true"#), "{body}");
    // The recorder was installed before the broker opened: the default
    // exchange, created at open, counts too.
    let (status, metrics) = http(serve.http, "GET", "/metrics", "none", "");
    assert_eq!(status, 200);
    for line in [
        r#"tern_queue_messages_ready{vhost="/",queue="q"} 1"#,
        r#"tern_queue_messages_published_total{vhost="/",queue="q"} 1"#,
        r#"tern_exchange_messages_published_total{vhost="/",exchange=""} 1"#,
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in:\n{metrics}");
    }

    serve.signal("TERM");
    assert_eq!(serve.wait(Duration::from_secs(10)).code(), Some(0));
    assert!(
        TcpStream::connect(serve.http).is_err(),
        "no longer listening"
    );
}

#[test]
fn a_taken_http_port_names_the_address_and_the_flag() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let err = run_failing(
        &[
            "serve",
            "--data-dir",
            data,
            "--amqp-addr",
            "127.0.0.1:0",
            "--http-addr",
            &addr,
        ],
        &[],
    );
    assert!(
        err.contains(&format!("cannot listen for HTTP on {addr}")),
        "{err}"
    );
    assert!(err.contains("already in use"), "{err}");
    assert!(
        err.contains("--http-addr") && err.contains("TERN_HTTP_ADDR"),
        "{err}"
    );
    // The data directory was released on the way out: a server starts on it.
    let mut serve = Serve::start(Path::new(data));
    serve.signal("TERM");
    assert_eq!(serve.wait(Duration::from_secs(10)).code(), Some(0));
}

#[test]
fn flags_override_the_environment() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let flag_dir = dir.path().join("from-flag");
    let env_dir = dir.path().join("from-env");
    let mut serve = Serve::start_with(
        &[
            "serve",
            "--data-dir",
            flag_dir.to_str().unwrap(),
            "--amqp-addr",
            "127.0.0.1:0",
        ],
        &[
            ("TERN_AMQP_ADDR", &taken),
            ("TERN_DATA_DIR", env_dir.to_str().unwrap()),
        ],
    );
    assert_ne!(serve.addr.to_string(), taken);
    assert!(flag_dir.join("store").is_dir());
    assert!(!env_dir.exists());
    serve.signal("TERM");
    assert_eq!(serve.wait(Duration::from_secs(10)).code(), Some(0));
    // The environment alone is used when no flag is given.
    let mut serve = Serve::start_with(
        &["serve"],
        &[
            ("TERN_AMQP_ADDR", "127.0.0.1:0"),
            ("TERN_DATA_DIR", env_dir.to_str().unwrap()),
        ],
    );
    assert!(env_dir.join("store").is_dir());
    serve.signal("TERM");
    assert_eq!(serve.wait(Duration::from_secs(10)).code(), Some(0));
}

#[test]
fn a_data_dir_that_is_a_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"hello").unwrap();
    let file = file.to_str().unwrap();
    let err = run_failing(
        &["serve", "--data-dir", file, "--amqp-addr", "127.0.0.1:0"],
        &[],
    );
    assert!(
        err.contains(file) && err.contains("not a directory"),
        "{err}"
    );
    assert!(err.contains("--data-dir"), "{err}");
}

#[test]
fn a_foreign_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("notes.txt"), b"mine").unwrap();
    let path = dir.path().to_str().unwrap();
    let err = run_failing(
        &["serve", "--data-dir", path, "--amqp-addr", "127.0.0.1:0"],
        &[],
    );
    assert!(err.contains("not a Tern data directory"), "{err}");
    assert!(!dir.path().join("store").exists(), "nothing was written");
}

#[test]
fn a_second_serve_on_the_same_data_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut first = Serve::start(&data);
    let err = run_failing(
        &[
            "serve",
            "--data-dir",
            data.to_str().unwrap(),
            "--amqp-addr",
            "127.0.0.1:0",
        ],
        &[],
    );
    assert!(err.contains("in use by another process"), "{err}");
    // The first one is unharmed.
    assert_speaks_amqp(first.addr);
    first.signal("TERM");
    assert_eq!(first.wait(Duration::from_secs(10)).code(), Some(0));
}

#[test]
fn completions_are_printed() {
    let out = Command::new(TERN)
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("serve"));
}

/// Publishes numbered messages with confirms to `queue` until the connection
/// fails, recording each confirmed number.
async fn publish_until_killed(
    url: String,
    queue: &str,
    round: u32,
    confirmed: Arc<Mutex<Vec<String>>>,
) {
    let Ok(conn) = Connection::connect(&url, ConnectionProperties::default()).await else {
        return;
    };
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions::durable(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for i in 0u32.. {
        let body = format!("{round}-{i}");
        let Ok(pending) = ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
        else {
            return;
        };
        match pending.await {
            Ok(Confirmation::Ack(None)) => confirmed.lock().unwrap().push(body),
            Ok(other) => panic!("unexpected confirmation {other:?}"),
            Err(_) => return,
        }
    }
}

/// SIGTERM while a publisher streams confirmed messages: the server exits
/// 0, and every message it confirmed is there after a restart, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_a_publishing_load_loses_no_confirmed_message() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let confirmed = Arc::new(Mutex::new(Vec::new()));
    let mut serve = Serve::start(&data);
    let publisher = tokio::spawn(publish_until_killed(
        serve.amqp_url(),
        "term.q",
        0,
        Arc::clone(&confirmed),
    ));
    let deadline = Instant::now() + Duration::from_secs(30);
    while confirmed.lock().unwrap().len() < 200 {
        assert!(Instant::now() < deadline, "publishing is too slow");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    serve.signal("TERM");
    let status = tokio::task::spawn_blocking(move || {
        let status = serve.wait(Duration::from_secs(20));
        (status, serve)
    })
    .await
    .unwrap();
    assert_eq!(
        status.0.code(),
        Some(0),
        "a graceful stop under load exits 0"
    );
    tokio::time::timeout(Duration::from_secs(20), publisher)
        .await
        .expect("the publisher notices the broker is gone")
        .unwrap();
    let confirmed = confirmed.lock().unwrap().clone();
    let mut serve = Serve::start(&data);
    let conn = Connection::connect(&serve.amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut got = Vec::new();
    while let Some(m) = ch
        .basic_get("term.q".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        got.push(String::from_utf8(m.delivery.data.clone()).unwrap());
    }
    let kept: Vec<&String> = got.iter().filter(|g| confirmed.contains(g)).collect();
    assert!(
        kept.iter().copied().eq(confirmed.iter()),
        "every confirmed message is back, in order: {} confirmed, {} of them back",
        confirmed.len(),
        kept.len()
    );
    conn.close(200, "bye".into()).await.unwrap();
    serve.signal("TERM");
    assert_eq!(serve.wait(Duration::from_secs(10)).code(), Some(0));
}

/// Takes up to `n` messages from the head of `queue` and acks them, then
/// makes sure the broker has them settled on disk: a `basic.qos` round
/// trip orders after the acks on the channel, and the ack log reaches the
/// disk within its 50 ms sync interval, so a pause well past it does.
async fn ack_some(url: &str, queue: &str, n: usize) -> Vec<String> {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut acked = Vec::new();
    for _ in 0..n {
        let Some(m) = ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await
            .unwrap()
        else {
            break;
        };
        m.delivery.ack(BasicAckOptions::default()).await.unwrap();
        acked.push(String::from_utf8(m.delivery.data.clone()).unwrap());
    }
    ch.basic_qos(10, BasicQosOptions::default()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    conn.close(200, "bye".into()).await.unwrap();
    acked
}

/// Twenty rounds of: ack a few messages from the head of the queue, then
/// publish with confirms and SIGKILL the broker mid-stream. Afterwards
/// every confirmed message that was not acked is there, once, in publish
/// order, and no acked one came back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_messages_survive_sigkill() {
    const ROUNDS: u32 = 20;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let confirmed = Arc::new(Mutex::new(Vec::new()));
    let mut acked: Vec<String> = Vec::new();
    for round in 0..ROUNDS {
        let serve = Serve::start(&data);
        if round > 0 {
            acked.extend(ack_some(&serve.amqp_url(), "durable.q", 5).await);
        }
        let publisher = tokio::spawn(publish_until_killed(
            serve.amqp_url(),
            "durable.q",
            round,
            Arc::clone(&confirmed),
        ));
        // Kill while the publisher is mid-stream.
        let goal = (round as usize + 1) * 20;
        let deadline = Instant::now() + Duration::from_secs(30);
        while confirmed.lock().unwrap().len() < goal {
            assert!(Instant::now() < deadline, "publishing is too slow");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(serve); // SIGKILL
        tokio::time::timeout(Duration::from_secs(20), publisher)
            .await
            .expect("the publisher notices the broker is gone")
            .unwrap();
    }
    assert!(
        acked.len() >= 50,
        "the rounds acked {} messages",
        acked.len()
    );
    let confirmed = confirmed.lock().unwrap().clone();
    let mut serve = Serve::start(&data);
    let conn = Connection::connect(&serve.amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut got = Vec::new();
    while let Some(m) = ch
        .basic_get("durable.q".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        got.push(String::from_utf8(m.delivery.data.clone()).unwrap());
    }
    let came_back: Vec<&String> = got.iter().filter(|g| acked.contains(g)).collect();
    assert!(
        came_back.is_empty(),
        "{} acked messages came back, e.g. {:?}",
        came_back.len(),
        &came_back[..came_back.len().min(5)]
    );
    let expected: Vec<&String> = confirmed.iter().filter(|c| !acked.contains(c)).collect();
    let missing: Vec<&&String> = expected.iter().filter(|c| !got.contains(c)).collect();
    assert!(
        missing.is_empty(),
        "{} confirmed messages lost, e.g. {:?}; got {}",
        missing.len(),
        &missing[..missing.len().min(5)],
        got.len()
    );
    let mut unique = got.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), got.len(), "no message comes back twice");
    let in_order: Vec<&String> = got.iter().filter(|g| confirmed.contains(g)).collect();
    assert!(
        in_order.iter().copied().eq(expected.iter().copied()),
        "confirmed messages come back in publish order"
    );
    conn.close(200, "bye".into()).await.unwrap();
    serve.signal("TERM");
    assert_eq!(serve.wait(Duration::from_secs(10)).code(), Some(0));
}
