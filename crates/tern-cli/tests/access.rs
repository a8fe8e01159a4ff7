//! `tern users`, `tern permissions` and `tern vhosts` as the real binary
//! against a real `tern serve`: create a user and a vhost, grant
//! permissions, check that the user's AMQP access follows them, change the
//! password, clear and delete; the errors for a non-administrator, a wrong
//! password, an existing user and a server that is not there; and
//! everything still there after the server is SIGKILLed and restarted.

#![allow(clippy::unwrap_used)] // a test that fails should panic

mod support;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use support::{run, stderr, stdout, Serve};

fn api(serve: &Serve, user: &str, password: &str) -> String {
    format!("http://{user}:{password}@{}", serve.http)
}

/// `tern ARGS --api URL`, in a blocking thread.
async fn tern(api: &str, args: &[&str], stdin: &[u8]) -> std::process::Output {
    let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    all.push("--api".into());
    all.push(api.to_string());
    let stdin = stdin.to_vec();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = all.iter().map(String::as_str).collect();
        run(&args, &[], &stdin)
    })
    .await
    .unwrap()
}

#[track_caller]
fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}; stderr: {}",
        out.status.code(),
        stderr(out)
    );
    stdout(out)
}

#[track_caller]
fn failed(out: &std::process::Output) -> String {
    assert_eq!(out.status.code(), Some(1), "stdout: {}", stdout(out));
    let err = stderr(out);
    assert!(err.starts_with("tern: error: "), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    err
}

async fn amqp(
    serve: &Serve,
    user: &str,
    password: &str,
    vhost: &str,
) -> Result<Connection, lapin::Error> {
    let url = format!("amqp://{user}:{password}@{}/{vhost}", serve.addr);
    Connection::connect(&url, ConnectionProperties::default()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_permissions_and_vhosts_are_managed_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut serve = Serve::start(&data);
    let admin = api(&serve, "guest", "guest");

    // A vhost and a user whose password comes on stdin.
    let out = ok(&tern(&admin, &["vhosts", "add", "staging"], b"").await);
    assert!(out.contains("vhost 'staging' created"), "{out}");
    let out = ok(&tern(&admin, &["vhosts", "add", "staging"], b"").await);
    assert!(out.contains("exists already"), "{out}");
    let out = ok(&tern(
        &admin,
        &["users", "add", "app", "--tags", "management"],
        b"s3cret\n",
    )
    .await);
    assert!(out.contains("user 'app' created"), "{out}");
    let err = failed(&tern(&admin, &["users", "add", "app", "--password", "x"], b"").await);
    assert!(
        err.contains("user 'app' exists") && err.contains("tern users passwd"),
        "{err}"
    );
    let out = ok(&tern(&admin, &["users", "list"], b"").await);
    assert!(
        out.contains("app\tmanagement\n") && out.contains("guest\tadministrator\n"),
        "{out}"
    );
    assert!(!out.contains("s3cret"), "{out}");

    // No permissions yet: AMQP refuses the vhost.
    assert!(amqp(&serve, "app", "s3cret", "staging").await.is_err());
    let out = ok(&tern(
        &admin,
        &[
            "permissions",
            "set",
            "--vhost",
            "staging",
            "app",
            "^app\\.",
            ".*",
            ".*",
        ],
        b"",
    )
    .await);
    assert!(
        out.contains("permissions of user 'app' in vhost 'staging' set"),
        "{out}"
    );
    let out = ok(&tern(&admin, &["permissions", "list", "--vhost", "staging"], b"").await);
    assert_eq!(
        out,
        "VHOST\tUSER\tCONFIGURE\tWRITE\tREAD\nstaging\tapp\t^app\\.\t.*\t.*\n"
    );
    let json = ok(&tern(&admin, &["permissions", "list", "--json"], b"").await);
    let all: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(all.as_array().unwrap().len(), 2, "{json}");
    let conn = amqp(&serve, "app", "s3cret", "staging").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "app.jobs".into(),
        QueueDeclareOptions::durable(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let ch = conn.create_channel().await.unwrap();
    assert!(ch
        .queue_declare(
            "other".into(),
            QueueDeclareOptions::durable(),
            FieldTable::default()
        )
        .await
        .is_err());
    conn.close(200, "bye".into()).await.unwrap();

    // app is not an administrator: 403, named.
    let as_app = api(&serve, "app", "s3cret");
    let err = failed(&tern(&as_app, &["users", "list"], b"").await);
    assert!(
        err.contains("user 'app' may not list users") && err.contains("HTTP 403"),
        "{err}"
    );
    let err = failed(&tern(&api(&serve, "app", "wrong"), &["vhosts", "list"], b"").await);
    assert!(err.contains("HTTP 401") && err.contains("--url"), "{err}");
    assert!(!err.contains("wrong"), "the password is not shown: {err}");

    // A new password; the old one stops working.
    ok(&tern(
        &admin,
        &["users", "passwd", "app", "--password", "n3w"],
        b"",
    )
    .await);
    assert!(amqp(&serve, "app", "s3cret", "staging").await.is_err());
    let out = ok(&tern(&admin, &["users", "list", "--json"], b"").await);
    assert!(
        out.contains(r#""tags":["management"]"#),
        "passwd keeps the tags: {out}"
    );

    // Everything survives a SIGKILL right after the calls returned: the
    // API answers once the change is fsynced.
    serve.child.kill().unwrap();
    serve.child.wait().unwrap();
    drop(serve);
    let serve = Serve::start(&data);
    let admin = api(&serve, "guest", "guest");
    let conn = amqp(&serve, "app", "n3w", "staging").await.unwrap();
    conn.close(200, "bye".into()).await.unwrap();
    let out = ok(&tern(&admin, &["vhosts", "list"], b"").await);
    assert!(out.contains("staging\t1\t0\n"), "{out}");

    // Clear, delete.
    ok(&tern(
        &admin,
        &["permissions", "clear", "--vhost", "staging", "app"],
        b"",
    )
    .await);
    assert!(amqp(&serve, "app", "n3w", "staging").await.is_err());
    let err = failed(
        &tern(
            &admin,
            &["permissions", "clear", "--vhost", "staging", "app"],
            b"",
        )
        .await,
    );
    assert!(
        err.contains("no permissions for user 'app' in vhost 'staging'")
            && err.contains("HTTP 404"),
        "{err}"
    );
    ok(&tern(&admin, &["users", "delete", "app"], b"").await);
    let err = failed(&tern(&admin, &["users", "delete", "app"], b"").await);
    assert!(err.contains("no user 'app'"), "{err}");
    let out = ok(&tern(&admin, &["vhosts", "delete", "staging"], b"").await);
    assert!(out.contains("vhost 'staging' deleted"), "{out}");
    let out = ok(&tern(&admin, &["vhosts", "list"], b"").await);
    assert!(!out.contains("staging"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_is_not_there_and_bad_urls_are_explained() {
    // A port nothing listens on: bind one and drop it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://guest:s3cret@127.0.0.1:{port}");
    let err = failed(&tern(&url, &["vhosts", "list"], b"").await);
    assert!(
        err.contains("is `tern serve` running?") && err.contains("TERN_URL"),
        "{err}"
    );
    assert!(
        err.contains("guest:***@") && !err.contains("s3cret"),
        "{err}"
    );
    let err = failed(&tern("https://h:1", &["vhosts", "list"], b"").await);
    assert!(err.contains("http://"), "{err}");
    let err = failed(&tern(&url, &["users", "add", "x"], b"").await);
    assert!(err.contains("no password"), "{err}");
}
