//! `tern serve` configuration, run as the real binary: defaults, the TOML
//! file under `TERN_*` variables under flags, `--print-config` (token
//! redacted), a server that takes everything from the file and logs JSON,
//! and one clear error (exit 1, no panic) for every kind of bad value.

#![allow(clippy::unwrap_used)] // a test that fails should panic

mod support;

use std::path::Path;

use support::{run, stderr, stdout, Serve};

/// `tern serve --print-config` with `args` and `env`, expected to succeed;
/// its stdout.
fn print_config(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut all = vec!["serve", "--print-config"];
    all.extend_from_slice(args);
    let out = run(&all, env, b"");
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    stdout(&out)
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

/// The value of `key` in printed TOML.
fn value(toml: &str, key: &str) -> Option<String> {
    toml.lines()
        .find_map(|l| l.strip_prefix(&format!("{key} = ")))
        .map(|v| v.trim_matches('"').to_string())
}

#[test]
fn print_config_shows_the_defaults() {
    let toml = print_config(&[], &[]);
    assert_eq!(value(&toml, "data_dir").as_deref(), Some("./tern-data"));
    assert_eq!(value(&toml, "amqp_addr").as_deref(), Some("127.0.0.1:5672"));
    assert_eq!(
        value(&toml, "http_addr").as_deref(),
        Some("127.0.0.1:15672")
    );
    assert_eq!(value(&toml, "log_format").as_deref(), Some("pretty"));
    assert_eq!(value(&toml, "log_level").as_deref(), Some("info"));
    assert_eq!(value(&toml, "http_token"), None, "no token unless set");
}

#[test]
fn flags_beat_the_environment_which_beats_the_file_which_beats_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "tern.toml",
        r#"
data_dir = "/from/file"
amqp_addr = "10.0.0.1:1111"
http_addr = "10.0.0.1:2222"
http_token = "file-secret"
log_format = "json"
log_level = "debug"
"#,
    );
    // The file alone: every key wins over its default.
    let toml = print_config(&["--config", &file], &[]);
    assert_eq!(value(&toml, "data_dir").as_deref(), Some("/from/file"));
    assert_eq!(value(&toml, "amqp_addr").as_deref(), Some("10.0.0.1:1111"));
    assert_eq!(value(&toml, "http_addr").as_deref(), Some("10.0.0.1:2222"));
    assert_eq!(value(&toml, "log_format").as_deref(), Some("json"));
    assert_eq!(value(&toml, "log_level").as_deref(), Some("debug"));
    assert_eq!(value(&toml, "http_token").as_deref(), Some("<redacted>"));
    assert!(
        !toml.contains("file-secret"),
        "the token never shows: {toml}"
    );

    // The environment over the file; a flag over both.
    let env = [
        ("TERN_AMQP_ADDR", "10.0.0.2:1111"),
        ("TERN_HTTP_ADDR", "10.0.0.2:2222"),
        ("TERN_LOG_FORMAT", "pretty"),
        ("TERN_HTTP_TOKEN", "env-secret"),
    ];
    let toml = print_config(&["--config", &file, "--http-addr", "10.0.0.3:2222"], &env);
    assert_eq!(value(&toml, "amqp_addr").as_deref(), Some("10.0.0.2:1111"));
    assert_eq!(value(&toml, "http_addr").as_deref(), Some("10.0.0.3:2222"));
    assert_eq!(value(&toml, "log_format").as_deref(), Some("pretty"));
    // What neither flag nor variable sets still comes from the file.
    assert_eq!(value(&toml, "data_dir").as_deref(), Some("/from/file"));
    assert_eq!(value(&toml, "log_level").as_deref(), Some("debug"));
    assert!(!toml.contains("env-secret"), "{toml}");

    // The file through TERN_CONFIG; RUST_LOG over the file's level, and
    // TERN_LOG_LEVEL over RUST_LOG.
    let toml = print_config(&[], &[("TERN_CONFIG", &file), ("RUST_LOG", "warn")]);
    assert_eq!(value(&toml, "data_dir").as_deref(), Some("/from/file"));
    assert_eq!(value(&toml, "log_level").as_deref(), Some("warn"));
    let toml = print_config(
        &["--config", &file],
        &[("RUST_LOG", "warn"), ("TERN_LOG_LEVEL", "trace")],
    );
    assert_eq!(value(&toml, "log_level").as_deref(), Some("trace"));
}

#[test]
fn serve_takes_its_settings_from_the_file_and_logs_json() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data-from-file");
    let file = write(
        dir.path(),
        "tern.toml",
        &format!(
            "data_dir = {:?}\namqp_addr = \"127.0.0.1:0\"\nhttp_addr = \"127.0.0.1:0\"\nlog_format = \"json\"\nlog_level = \"info\"\n",
            data.to_str().unwrap()
        ),
    );
    let mut serve = Serve::start_with(&["serve", "--config", &file], &[]);
    assert_eq!(serve.data_dir, data.to_str().unwrap());
    assert_ne!(serve.addr.port(), 0);
    assert!(
        data.join("store").is_dir(),
        "the broker opened the file's data_dir"
    );
    assert_eq!(serve.stop(), Some(0));
    let logs = serve.stderr.lock().unwrap().clone();
    let lines: Vec<&str> = logs.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "some logs");
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(
            v.get("level").is_some() && v.get("fields").is_some(),
            "{line}"
        );
    }
    assert!(lines.iter().any(|l| l.contains("broker opened")), "{logs}");
}

#[test]
fn pretty_logs_are_not_json_and_the_level_filters() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let d = data.to_str().unwrap();
    let args = [
        "serve",
        "--data-dir",
        d,
        "--amqp-addr",
        "127.0.0.1:0",
        "--http-addr",
        "127.0.0.1:0",
    ];
    let mut serve = Serve::start_with(&args, &[("TERN_LOG_FORMAT", "pretty")]);
    assert_eq!(serve.stop(), Some(0));
    let logs = serve.stderr.lock().unwrap().clone();
    assert!(logs.contains("broker opened"), "{logs}");
    assert!(!logs.trim_start().starts_with('{'), "{logs}");
    // `error` hides the info lines.
    let mut serve = Serve::start_with(&args, &[("TERN_LOG_LEVEL", "error")]);
    assert_eq!(serve.stop(), Some(0));
    let logs = serve.stderr.lock().unwrap().clone();
    assert!(!logs.contains("broker opened"), "{logs}");
}

/// `tern serve --config FILE` with `text` in FILE fails with exit code 1
/// and a one-line error naming the file and every one of `expect`.
fn assert_bad_file(text: &str, expect: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "bad.toml", text);
    let out = run(&["serve", "--config", &file, "--print-config"], &[], b"");
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{text:?}: {err}");
    assert!(stdout(&out).is_empty(), "nothing printed for {text:?}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("tern: error: "), "{err}");
    assert!(err.contains(&file), "names the file: {err}");
    for e in expect {
        assert!(err.contains(e), "{text:?}: expected {e:?} in: {err}");
    }
}

#[test]
fn every_bad_file_value_gets_a_clear_error() {
    // An unknown (misspelt) key: named, with the keys there are.
    assert_bad_file(
        "amqp_adr = \"127.0.0.1:5672\"\n",
        &["`amqp_adr`", "amqp_addr", "spelling"],
    );
    // A value of the wrong type.
    assert_bad_file(
        "\n\namqp_addr = 5672\n",
        &[":3", "`amqp_addr`", "expected a string", "fix the value"],
    );
    // A log format that does not exist.
    assert_bad_file(
        "log_format = \"xml\"\n",
        &["`log_format`", "xml", "pretty", "json"],
    );
    // Addresses that are not HOST:PORT.
    assert_bad_file(
        "amqp_addr = \"localhost\"\n",
        &["`amqp_addr`", "not a HOST:PORT", "127.0.0.1:5672"],
    );
    assert_bad_file(
        "http_addr = \"127.0.0.1:99999\"\n",
        &["`http_addr`", "not a HOST:PORT", "127.0.0.1:15672"],
    );
    // A log level that is not one.
    assert_bad_file(
        "log_level = \"verbose\"\n",
        &["`log_level`", "verbose", "debug"],
    );
    assert_bad_file("log_level = \"tern_amqp=loud\"\n", &["`log_level`", "loud"]);
    // Empty values.
    assert_bad_file("data_dir = \"\"\n", &["`data_dir`", "empty"]);
    assert_bad_file("http_token = \"  \"\n", &["`http_token`", "empty"]);
    // Not TOML at all.
    assert_bad_file("data_dir = [\n", &[":1", "`data_dir`"]);
}

#[test]
fn bad_flags_and_variables_name_the_flag() {
    let out = run(
        &["serve", "--print-config", "--amqp-addr", "nowhere"],
        &[],
        b"",
    );
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("--amqp-addr (or TERN_AMQP_ADDR)"), "{err}");
    let out = run(
        &["serve", "--print-config"],
        &[("TERN_LOG_LEVEL", "chatty")],
        b"",
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("TERN_LOG_LEVEL"), "{}", stderr(&out));
    // clap refuses an unknown log format with its usage error (exit 2).
    let out = run(
        &["serve", "--print-config", "--log-format", "xml"],
        &[],
        b"",
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("pretty"), "{}", stderr(&out));
}

#[test]
fn a_missing_config_file_is_named() {
    let out = run(&["serve", "--config", "/no/such/tern.toml"], &[], b"");
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("/no/such/tern.toml") && err.contains("--config"),
        "{err}"
    );
}
