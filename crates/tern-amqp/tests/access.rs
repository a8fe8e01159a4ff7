//! Users and permissions over AMQP, with real clients: refused logins
//! (wrong password, unknown user: 403), AMQPLAIN (lapin and amqprs), a
//! vhost the user has no permissions in (530), per-operation checks that
//! close only the offending channel (403) and follow permission changes,
//! the `user-id` property checked against the login (406), and users that
//! survive a restart of the server.
//!
//! Tern only: the RabbitMQ of the differential runs is reached over AMQP
//! alone, and creating users there needs its management API or
//! `rabbitmqctl`.

#![allow(clippy::unwrap_used)] // a test helper that fails should panic

mod target;

use std::time::Duration;

use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tern_amqp::AmqpServer;
use tern_broker::{Broker, BrokerConfig, Permissions, UserTag};

use target::{reply_code, Harness};

fn uri(h: &Harness, user: &str, password: &str, vhost: &str) -> String {
    format!(
        "amqp://{user}:{password}@127.0.0.1:{}/{vhost}",
        h.server.local_addr().port()
    )
}

async fn connect(uri: &str) -> Result<Connection, lapin::Error> {
    tokio::time::timeout(
        Duration::from_secs(10),
        Connection::connect(uri, ConnectionProperties::default()),
    )
    .await
    .expect("the handshake ends")
}

async fn add_user(broker: &Broker, name: &str, password: &str, p: Option<(&str, &str, &str)>) {
    broker
        .put_user(name, Some(password), vec![UserTag::Management])
        .await
        .unwrap();
    if let Some((c, w, r)) = p {
        broker
            .set_permissions("/", name, Permissions::new(c, w, r).unwrap())
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_passwords_and_unknown_users_are_refused_with_403() {
    let h = Harness::start().await;
    add_user(&h.broker, "bob", "s3cret", Some((".*", ".*", ".*"))).await;
    for (user, password) in [("bob", "wrong"), ("nobody", "s3cret"), ("guest", "bob")] {
        let err = connect(&uri(&h, user, password, "%2f")).await.unwrap_err();
        assert_eq!(reply_code(&err), Some(403), "{user}: {err:?}");
        assert!(
            format!("{err:?}").contains("Login was refused using authentication mechanism PLAIN"),
            "{err:?}"
        );
    }
    let conn = connect(&uri(&h, "bob", "s3cret", "%2f")).await.unwrap();
    // The registry shows who is connected.
    let connections = h.broker.connections();
    assert!(
        connections.iter().any(|c| c.user == "bob"),
        "{connections:?}"
    );
    conn.close(200, "bye".into()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqplain_logs_in_with_lapin_and_amqprs() {
    let h = Harness::start().await;
    add_user(&h.broker, "ann", "pw", Some((".*", ".*", ".*"))).await;
    let plain = uri(&h, "ann", "pw", "%2f");
    let conn = connect(&format!("{plain}?auth_mechanism=amqplain"))
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "ann.q".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    conn.close(200, "bye".into()).await.unwrap();
    let wrong = format!("{}?auth_mechanism=amqplain", uri(&h, "ann", "nope", "%2f"));
    let err = connect(&wrong).await.unwrap_err();
    assert_eq!(reply_code(&err), Some(403), "{err:?}");
    assert!(format!("{err:?}").contains("mechanism AMQPLAIN"), "{err:?}");

    use amqprs::connection::{Connection as Amqprs, OpenConnectionArguments};
    use amqprs::security::SecurityCredentials;
    let port = h.server.local_addr().port();
    let mut args = OpenConnectionArguments::new("127.0.0.1", port, "ann", "pw");
    args.credentials(SecurityCredentials::new_amqplain("ann", "pw"));
    let conn = Amqprs::open(&args).await.unwrap();
    conn.close().await.unwrap();
    args.credentials(SecurityCredentials::new_amqplain("ann", "bad"));
    let err = Amqprs::open(&args).await.err().expect("refused");
    assert!(err.to_string().contains("403"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vhost_without_permissions_is_refused_with_530() {
    let h = Harness::start().await;
    add_user(&h.broker, "bob", "pw", None).await;
    h.broker.add_vhost("/x").await.unwrap();
    let err = connect(&uri(&h, "bob", "pw", "%2fx")).await.unwrap_err();
    assert_eq!(reply_code(&err), Some(530), "{err:?}");
    assert!(
        format!("{err:?}").contains("access to vhost '/x' refused for user 'bob'"),
        "{err:?}"
    );
    // Granting any permission there lets bob in.
    h.broker
        .set_permissions("/x", "bob", Permissions::new("", "", "").unwrap())
        .await
        .unwrap();
    let conn = connect(&uri(&h, "bob", "pw", "%2fx")).await.unwrap();
    conn.close(200, "bye".into()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_only_user_publishes_but_reading_closes_only_that_channel() {
    let h = Harness::start().await;
    // The queue exists; the writer may only write (to the default exchange).
    let admin = connect(&uri(&h, "guest", "guest", "%2f")).await.unwrap();
    let ach = admin.create_channel().await.unwrap();
    ach.queue_declare(
        "jobs".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    add_user(&h.broker, "writer", "pw", Some(("", "^amq\\.default$", ""))).await;
    let conn = connect(&uri(&h, "writer", "pw", "%2f")).await.unwrap();
    let publisher = conn.create_channel().await.unwrap();
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let confirm = publisher
        .basic_publish(
            "".into(),
            "jobs".into(),
            BasicPublishOptions::default(),
            b"job",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack());

    let reader = conn.create_channel().await.unwrap();
    let err = reader
        .basic_consume(
            "jobs".into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(reply_code(&err), Some(403), "{err:?}");
    assert!(
        format!("{err:?}")
            .contains("access to queue 'jobs' in vhost '/' refused for user 'writer'"),
        "{err:?}"
    );
    assert!(!reader.status().connected());
    // Each refused operation closes its own channel only.
    for op in ["get", "purge", "declare", "publish-elsewhere"] {
        let ch = conn.create_channel().await.unwrap();
        let err = match op {
            "get" => ch
                .basic_get("jobs".into(), BasicGetOptions::default())
                .await
                .map(|_| ())
                .unwrap_err(),
            "purge" => ch
                .queue_purge("jobs".into(), QueuePurgeOptions::default())
                .await
                .map(|_| ())
                .unwrap_err(),
            "declare" => ch
                .queue_declare(
                    "mine".into(),
                    QueueDeclareOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map(|_| ())
                .unwrap_err(),
            _ => {
                ch.confirm_select(ConfirmSelectOptions::default())
                    .await
                    .unwrap();
                let published = ch
                    .basic_publish(
                        "amq.topic".into(),
                        "k".into(),
                        BasicPublishOptions::default(),
                        b"x",
                        BasicProperties::default(),
                    )
                    .await;
                match published {
                    Ok(confirm) => confirm.await.map(|_| ()).unwrap_err(),
                    Err(e) => e,
                }
            }
        };
        assert_eq!(reply_code(&err), Some(403), "{op}: {err:?}");
    }
    // The connection and the publishing channel live on.
    assert!(conn.status().connected());
    let confirm = publisher
        .basic_publish(
            "".into(),
            "jobs".into(),
            BasicPublishOptions::default(),
            b"job2",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack());
    // Both messages arrived, and nothing was purged.
    let q = ach
        .queue_declare(
            "jobs".into(),
            QueueDeclareOptions::default().passive(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(q.message_count(), 2);
    // A revoked permission applies to the open channel's next publish.
    h.broker
        .set_permissions(
            "/",
            "writer",
            Permissions::new("", "^nothing$", "").unwrap(),
        )
        .await
        .unwrap();
    let published = publisher
        .basic_publish(
            "".into(),
            "jobs".into(),
            BasicPublishOptions::default(),
            b"job3",
            BasicProperties::default(),
        )
        .await;
    let err = match published {
        Ok(confirm) => confirm.await.map(|_| ()).unwrap_err(),
        Err(e) => e,
    };
    assert_eq!(reply_code(&err), Some(403), "{err:?}");
    assert!(
        format!("{err:?}").contains("exchange 'amq.default' in vhost '/'"),
        "{err:?}"
    );
    conn.close(200, "bye".into()).await.unwrap();
    admin.close(200, "bye".into()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_may_carry_only_its_own_users_user_id() {
    let h = Harness::start().await;
    add_user(&h.broker, "ann", "pw", Some((".*", ".*", ".*"))).await;
    let conn = connect(&uri(&h, "ann", "pw", "%2f")).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "inbox".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let publish = |ch: lapin::Channel, user_id: &'static str| async move {
        let published = ch
            .basic_publish(
                "".into(),
                "inbox".into(),
                BasicPublishOptions::default(),
                b"hi",
                BasicProperties::default().with_user_id(user_id.into()),
            )
            .await;
        match published {
            Ok(confirm) => confirm.await.map(|_| ()),
            Err(e) => Err(e),
        }
    };
    publish(ch.clone(), "ann").await.unwrap();
    let err = publish(ch.clone(), "guest").await.unwrap_err();
    assert_eq!(reply_code(&err), Some(406), "{err:?}");
    assert!(
        format!("{err:?}")
            .contains("user_id property set to 'guest' but authenticated user was 'ann'"),
        "{err:?}"
    );
    assert!(conn.status().connected());
    conn.close(200, "bye".into()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_and_permissions_survive_a_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    broker.put_user("svc", Some("pw"), vec![]).await.unwrap();
    broker
        .set_permissions("/", "svc", Permissions::new("^svc\\.", "", "").unwrap())
        .await
        .unwrap();
    broker.close().unwrap();

    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let server = AmqpServer::bind("127.0.0.1:0".parse().unwrap(), broker.clone())
        .await
        .unwrap();
    let base = format!("127.0.0.1:{}/%2f", server.local_addr().port());
    let conn = connect(&format!("amqp://svc:pw@{base}")).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "svc.q".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let err = ch
        .queue_declare(
            "other".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(reply_code(&err), Some(403), "{err:?}");
    // A server-named queue is checked under a generated name.
    let ch = conn.create_channel().await.unwrap();
    let err = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(reply_code(&err), Some(403), "{err:?}");
    assert!(format!("{err:?}").contains("queue 'amq.gen-"), "{err:?}");
    broker
        .set_permissions(
            "/",
            "svc",
            Permissions::new("^(svc\\.|amq\\.gen-)", "", "").unwrap(),
        )
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert!(q.name().as_str().starts_with("amq.gen-"));
    let err = connect(&format!("amqp://svc:wrong@{base}"))
        .await
        .unwrap_err();
    assert_eq!(reply_code(&err), Some(403), "{err:?}");
    conn.close(200, "bye".into()).await.unwrap();
    server.shutdown().await;
    broker.close().unwrap();
}
