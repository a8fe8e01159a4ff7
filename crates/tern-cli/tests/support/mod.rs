//! Running the real `tern` binary from tests: `tern serve` on free ports,
//! and one-shot commands with a clean environment.

#![allow(dead_code)] // each test file uses part of it

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

pub(crate) const TERN: &str = env!("CARGO_BIN_EXE_tern");

/// Every variable `tern` reads, removed so that the test's own
/// environment (or a developer's) cannot leak in.
const TERN_VARS: [&str; 16] = [
    "TERN_VM_MEMORY_HIGH_WATERMARK",
    "TERN_DISK_FREE_LIMIT",
    "TERN_AMQPS_ADDR",
    "TERN_TLS_CERT",
    "TERN_TLS_KEY",
    "TERN_CONFIG",
    "TERN_DATA_DIR",
    "TERN_AMQP_ADDR",
    "TERN_HTTP_ADDR",
    "TERN_HTTP_TOKEN",
    "TERN_LOG_FORMAT",
    "TERN_LOG_LEVEL",
    "TERN_URL",
    "TERN_API_URL",
    "RUST_LOG",
    "NO_COLOR",
];

/// A `tern` command with a clean environment plus `env`.
pub(crate) fn tern(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(TERN);
    cmd.args(args);
    for var in TERN_VARS {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Runs `tern` to the end with `stdin` as its input.
pub(crate) fn run(args: &[&str], env: &[(&str, &str)], stdin: &[u8]) -> Output {
    let mut child = tern(args, env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let out = loop {
        if child.try_wait().unwrap().is_some() {
            break child.wait_with_output().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "tern {args:?} did not finish; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        thread::sleep(Duration::from_millis(10));
    };
    out
}

pub(crate) fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub(crate) fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A running `tern serve`, killed if the test ends without stopping it.
pub(crate) struct Serve {
    pub(crate) child: Child,
    pub(crate) addr: SocketAddr,
    pub(crate) http: SocketAddr,
    /// The AMQPS listener, when TLS is configured.
    pub(crate) amqps: Option<SocketAddr>,
    /// The `tern: data directory …` line's directory.
    pub(crate) data_dir: String,
    pub(crate) stderr: Arc<Mutex<String>>,
}

impl Serve {
    /// `tern serve` on `data_dir` with AMQP and HTTP on free ports.
    pub(crate) fn start(data_dir: &Path) -> Serve {
        let dir = data_dir.to_str().unwrap();
        Serve::start_with(
            &[
                "serve",
                "--data-dir",
                dir,
                "--amqp-addr",
                "127.0.0.1:0",
                "--http-addr",
                "127.0.0.1:0",
            ],
            &[],
        )
    }

    /// Starts `tern ARGS` and waits for its three start-up lines.
    pub(crate) fn start_with(args: &[&str], env: &[(&str, &str)]) -> Serve {
        let mut child = tern(args, env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
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
        let deadline = Instant::now() + Duration::from_secs(30);
        let (mut amqp, mut http, mut amqps) = (None, None, None);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = lines.recv_timeout(left) else {
                let _ = child.kill();
                let status = child.wait().unwrap();
                panic!(
                    "tern serve did not start ({status}); stderr:\n{}",
                    stderr.lock().unwrap()
                );
            };
            if let Some(a) = line.strip_prefix("tern: AMQP listening on ") {
                amqp = Some(a.trim().parse().unwrap());
            }
            if let Some(a) = line.strip_prefix("tern: AMQPS listening on ") {
                amqps = Some(a.trim().parse().unwrap());
            }
            if let Some(a) = line.strip_prefix("tern: HTTP listening on ") {
                http = Some(a.trim().parse().unwrap());
            }
            if let Some(dir) = line.strip_prefix("tern: data directory ") {
                return Serve {
                    child,
                    addr: amqp.expect("the AMQP line comes first"),
                    http: http.expect("the HTTP line comes first"),
                    amqps,
                    data_dir: dir.to_string(),
                    stderr,
                };
            }
        }
    }

    pub(crate) fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }

    /// The management API's URL with guest's credentials, for `--api`.
    pub(crate) fn api_url(&self) -> String {
        format!("http://guest:guest@{}", self.http)
    }

    /// SIGTERM, then the exit code.
    pub(crate) fn stop(&mut self) -> Option<i32> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                thread::sleep(Duration::from_millis(100));
                return status.code();
            }
            assert!(Instant::now() < deadline, "tern serve did not stop");
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
