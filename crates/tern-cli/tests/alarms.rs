//! `tern serve`'s resource-alarm settings, run as the real binary: the
//! defaults (RabbitMQ's), flags over variables over the file, clear errors
//! for bad values, and a disk limit above any disk's free space raising the
//! disk alarm that the HTTP API then reports.

#![allow(clippy::unwrap_used)] // a test that fails should panic

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use support::{run, stderr, stdout, Serve};

fn value(toml: &str, key: &str) -> Option<String> {
    toml.lines()
        .find_map(|l| l.strip_prefix(&format!("{key} = ")))
        .map(|v| v.trim_matches('"').to_string())
}

fn print_config(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut all = vec!["serve", "--print-config"];
    all.extend_from_slice(args);
    let out = run(&all, env, b"");
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    stdout(&out)
}

#[test]
fn alarm_settings_default_to_rabbitmqs_and_merge_like_the_others() {
    let toml = print_config(&[], &[]);
    assert_eq!(
        value(&toml, "vm_memory_high_watermark").as_deref(),
        Some("0.4")
    );
    assert_eq!(value(&toml, "disk_free_limit").as_deref(), Some("50MB"));

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tern.toml");
    std::fs::write(
        &file,
        "vm_memory_high_watermark = 0.5\ndisk_free_limit = \"1GB\"\n",
    )
    .unwrap();
    let file = file.to_str().unwrap();
    let toml = print_config(&["--config", file], &[]);
    assert_eq!(
        value(&toml, "vm_memory_high_watermark").as_deref(),
        Some("0.5")
    );
    assert_eq!(value(&toml, "disk_free_limit").as_deref(), Some("1GB"));

    let env = [
        ("TERN_VM_MEMORY_HIGH_WATERMARK", "2GiB"),
        ("TERN_DISK_FREE_LIMIT", "2GB"),
    ];
    let toml = print_config(&["--config", file], &env);
    assert_eq!(
        value(&toml, "vm_memory_high_watermark").as_deref(),
        Some("2GiB")
    );
    assert_eq!(value(&toml, "disk_free_limit").as_deref(), Some("2GB"));

    let toml = print_config(
        &[
            "--config",
            file,
            "--vm-memory-high-watermark",
            "0.6",
            "--disk-free-limit",
            "100MiB",
        ],
        &env,
    );
    assert_eq!(
        value(&toml, "vm_memory_high_watermark").as_deref(),
        Some("0.6")
    );
    assert_eq!(value(&toml, "disk_free_limit").as_deref(), Some("100MiB"));
}

#[test]
fn bad_alarm_settings_name_the_setting_and_the_fix() {
    for (args, expect) in [
        (
            ["--vm-memory-high-watermark", "1.5"],
            ["--vm-memory-high-watermark", "fraction from 0 to 1"],
        ),
        (
            ["--vm-memory-high-watermark", "lots"],
            ["--vm-memory-high-watermark", "2GiB"],
        ),
        (
            ["--disk-free-limit", "5 parsecs"],
            ["--disk-free-limit", "not a size unit"],
        ),
    ] {
        let mut all = vec!["serve", "--print-config"];
        all.extend_from_slice(&args);
        let out = run(&all, &[], b"");
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        for e in expect {
            assert!(err.contains(e), "expected {e:?} in: {err}");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tern.toml");
    std::fs::write(&file, "disk_free_limit = \"-1MB\"\n").unwrap();
    let out = run(
        &[
            "serve",
            "--print-config",
            "--config",
            file.to_str().unwrap(),
        ],
        &[],
        b"",
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("disk_free_limit") && err.contains("tern.toml"),
        "{err}"
    );
}

fn get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Basic Z3Vlc3Q6Z3Vlc3Q=\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    reply
}

#[test]
fn a_disk_limit_above_the_free_space_raises_the_disk_alarm() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut serve = Serve::start_with(
        &[
            "serve",
            "--data-dir",
            data.to_str().unwrap(),
            "--amqp-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
            "--disk-free-limit",
            "16000000TB",
        ],
        &[],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let overview = get(serve.http, "/api/overview");
        if overview.contains(r#""alarms":["disk"]"#) {
            break;
        }
        assert!(Instant::now() < deadline, "no disk alarm: {overview}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let metrics = get(serve.http, "/metrics");
    assert!(
        metrics.contains("tern_alarm_active{resource=\"disk\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tern_alarm_active{resource=\"memory\"} 0"),
        "{metrics}"
    );
    assert_eq!(serve.stop(), Some(0));
}
