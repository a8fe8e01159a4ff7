//! Users and permissions through the broker's API: the first start's guest,
//! login (one error for unknown users and wrong passwords, the loopback
//! rule), permission checks with RabbitMQ's regex semantics, and durability
//! across reopening, vhost deletion and the definitions log's compaction.

#![allow(clippy::unwrap_used)] // a test helper that fails should panic

use std::net::IpAddr;

use tern_broker::*;

const LOCAL: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
const REMOTE: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::new(10, 1, 2, 3)));

fn open(dir: &std::path::Path) -> Broker {
    Broker::open(BrokerConfig::new(dir)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_start_creates_guest_as_a_local_administrator() {
    let dir = tempfile::tempdir().unwrap();
    let broker = open(dir.path());
    let users = broker.users();
    assert_eq!(users.len(), 1);
    assert_eq!(users[0].name.as_str(), "guest");
    assert_eq!(users[0].tags, vec![UserTag::Administrator]);
    let guest = broker.authenticate("guest", "guest", LOCAL).await.unwrap();
    assert!(guest.is_administrator());
    // In-process callers are local.
    broker.authenticate("guest", "guest", None).await.unwrap();
    let err = broker
        .authenticate("guest", "guest", REMOTE)
        .await
        .unwrap_err();
    assert_eq!(
        err,
        AuthError::LoopbackOnly {
            user: "guest".into()
        }
    );
    broker.check_vhost_access(&guest, "/").unwrap();
    for access in [Access::Configure, Access::Write, Access::Read] {
        broker
            .check_permission(&guest, "/", &Resource::queue("anything"), access)
            .unwrap();
    }
    let p = broker.permission("/", "guest").unwrap();
    assert_eq!(p.permissions, Permissions::full());
    broker.close().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_users_and_wrong_passwords_get_the_same_error() {
    let dir = tempfile::tempdir().unwrap();
    let broker = open(dir.path());
    broker
        .put_user("bob", Some("s3cret"), vec![])
        .await
        .unwrap();
    let wrong = broker
        .authenticate("bob", "guess", LOCAL)
        .await
        .unwrap_err();
    let unknown = broker
        .authenticate("bobby", "guess", LOCAL)
        .await
        .unwrap_err();
    assert!(matches!(wrong, AuthError::Refused { .. }));
    assert!(matches!(unknown, AuthError::Refused { .. }));
    assert_eq!(
        wrong.to_string().replace("'bob'", "'X'"),
        unknown.to_string().replace("'bobby'", "'X'")
    );
    // Bob is not loopback-only.
    let bob = broker.authenticate("bob", "s3cret", REMOTE).await.unwrap();
    assert!(!bob.is_administrator());
    // A verified login is cached, but a changed password is not the cached one.
    broker.authenticate("bob", "s3cret", LOCAL).await.unwrap();
    broker.change_password("bob", "n3w").await.unwrap();
    assert!(broker.authenticate("bob", "s3cret", LOCAL).await.is_err());
    broker.authenticate("bob", "n3w", LOCAL).await.unwrap();
    // No permissions anywhere yet.
    let err = broker.check_vhost_access(&bob, "/").unwrap_err();
    assert_eq!(
        err.to_string(),
        "access to vhost '/' refused for user 'bob'"
    );
    // A user without a password cannot log in with any.
    broker.put_user("svc", None, vec![]).await.unwrap();
    assert!(broker.authenticate("svc", "", LOCAL).await.is_err());
    assert!(!broker.user("svc").unwrap().has_password);
    // Deleting a user ends their logins.
    broker.delete_user("bob").await.unwrap();
    assert!(broker.authenticate("bob", "n3w", LOCAL).await.is_err());
    assert_eq!(
        broker.delete_user("bob").await.unwrap_err(),
        AccessError::UserNotFound("bob".into())
    );
    broker.close().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loopback_list_is_configurable() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = BrokerConfig::new(dir.path());
    config.access.loopback_users = vec![];
    let broker = Broker::open(config).unwrap();
    broker.authenticate("guest", "guest", REMOTE).await.unwrap();
    broker.put_user("ops", Some("pw"), vec![]).await.unwrap();
    broker.close().unwrap();
    let mut config = BrokerConfig::new(dir.path());
    config.access.loopback_users = vec!["ops".into()];
    let broker = Broker::open(config).unwrap();
    broker.authenticate("guest", "guest", REMOTE).await.unwrap();
    assert!(matches!(
        broker.authenticate("ops", "pw", REMOTE).await,
        Err(AuthError::LoopbackOnly { .. })
    ));
    broker.authenticate("ops", "pw", LOCAL).await.unwrap();
    // A wrong password from afar is still just refused.
    assert!(matches!(
        broker.authenticate("ops", "no", REMOTE).await,
        Err(AuthError::Refused { .. })
    ));
    broker.close().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissions_are_regexes_per_kind_of_access() {
    let dir = tempfile::tempdir().unwrap();
    let broker = open(dir.path());
    broker.put_user("app", Some("pw"), vec![]).await.unwrap();
    let app = broker.authenticate("app", "pw", LOCAL).await.unwrap();
    let p = Permissions::new("^app\\.", "^(amq\\.default|orders)$", "").unwrap();
    assert_eq!(
        broker.set_permissions("/", "app", p).await.unwrap(),
        Change::Created
    );
    broker.check_vhost_access(&app, "/").unwrap();
    let ok = |r: Resource, a| broker.check_permission(&app, "/", &r, a).is_ok();
    assert!(ok(Resource::queue("app.jobs"), Access::Configure));
    assert!(!ok(Resource::queue("jobs.app.x"), Access::Configure));
    assert!(ok(Resource::exchange(""), Access::Write));
    assert!(ok(Resource::exchange("orders"), Access::Write));
    assert!(!ok(Resource::exchange("orders2"), Access::Write));
    // Empty grants nothing.
    assert!(!ok(Resource::queue("app.jobs"), Access::Read));
    let err = broker
        .check_permission(&app, "/", &Resource::queue("app.jobs"), Access::Read)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "access to queue 'app.jobs' in vhost '/' refused for user 'app'"
    );
    // Other vhosts are separate.
    broker.add_vhost("other").await.unwrap();
    assert!(broker
        .check_permission(
            &app,
            "other",
            &Resource::queue("app.jobs"),
            Access::Configure
        )
        .is_err());
    assert!(broker.check_vhost_access(&app, "other").is_err());
    // Bad patterns, unknown users and vhosts are refused by name.
    assert!(matches!(
        Permissions::new("(", ".*", ".*"),
        Err(AccessError::InvalidPattern { .. })
    ));
    assert_eq!(
        broker
            .set_permissions("/", "nobody", Permissions::full())
            .await
            .unwrap_err(),
        AccessError::UserNotFound("nobody".into())
    );
    assert_eq!(
        broker
            .set_permissions("/nope", "app", Permissions::full())
            .await
            .unwrap_err(),
        AccessError::VhostNotFound("/nope".into())
    );
    // Changes apply to a logged-in user at once.
    broker.clear_permissions("/", "app").await.unwrap();
    assert!(!ok(Resource::queue("app.jobs"), Access::Configure));
    assert!(broker.check_vhost_access(&app, "/").is_err());
    broker.close().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_by_name_follow_the_same_patterns_and_list_the_users_vhosts() {
    let dir = tempfile::tempdir().unwrap();
    let broker = open(dir.path());
    broker.add_vhost("staging").await.unwrap();
    broker.add_vhost("prod").await.unwrap();
    broker.put_user("ops", Some("pw"), vec![]).await.unwrap();
    let p = Permissions::new("^ops\\.", "", "^ops\\.").unwrap();
    broker.set_permissions("staging", "ops", p).await.unwrap();
    let by_name =
        |vhost: &str, r: Resource, a| broker.check_user_permission("ops", vhost, &r, a).is_ok();
    assert!(by_name(
        "staging",
        Resource::queue("ops.jobs"),
        Access::Configure
    ));
    assert!(by_name(
        "staging",
        Resource::queue("ops.jobs"),
        Access::Read
    ));
    assert!(!by_name(
        "staging",
        Resource::queue("ops.jobs"),
        Access::Write
    ));
    assert!(!by_name(
        "staging",
        Resource::queue("jobs"),
        Access::Configure
    ));
    assert!(!by_name(
        "prod",
        Resource::queue("ops.jobs"),
        Access::Configure
    ));
    assert!(!by_name(
        "nowhere",
        Resource::queue("ops.jobs"),
        Access::Read
    ));
    // A name that is no user name is refused like an unknown user.
    assert!(broker
        .check_user_permission("", "staging", &Resource::queue("ops.jobs"), Access::Read)
        .is_err());
    let names = |v: Vec<VhostName>| v.iter().map(|v| v.to_string()).collect::<Vec<_>>();
    assert_eq!(names(broker.user_vhosts("ops")), ["staging"]);
    assert_eq!(names(broker.user_vhosts("guest")), ["/"]);
    assert!(broker.user_vhosts("nobody").is_empty());
    broker.delete_vhost("staging").await.unwrap();
    assert!(broker.user_vhosts("ops").is_empty());
    broker.close().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_and_permissions_survive_a_restart_and_deleted_vhosts_take_theirs() {
    let dir = tempfile::tempdir().unwrap();
    let broker = open(dir.path());
    broker
        .put_user(
            "ops",
            Some("pw"),
            vec![UserTag::Monitoring, UserTag::Management],
        )
        .await
        .unwrap();
    broker.add_vhost("staging").await.unwrap();
    broker
        .set_permissions("staging", "ops", Permissions::new("", ".*", "^q$").unwrap())
        .await
        .unwrap();
    broker
        .set_permissions("/", "ops", Permissions::full())
        .await
        .unwrap();
    broker.delete_user("guest").await.unwrap();
    broker.close().unwrap();

    let broker = open(dir.path());
    // Deleting every default user does not bring guest back.
    let names: Vec<String> = broker.users().iter().map(|u| u.name.to_string()).collect();
    assert_eq!(names, vec!["ops"]);
    assert_eq!(
        broker.user("ops").unwrap().tags,
        vec![UserTag::Management, UserTag::Monitoring]
    );
    let ops = broker.authenticate("ops", "pw", REMOTE).await.unwrap();
    let staging = broker.permission("staging", "ops").unwrap().permissions;
    assert_eq!(staging, Permissions::new("", ".*", "^q$").unwrap());
    broker
        .check_permission(&ops, "staging", &Resource::queue("q"), Access::Read)
        .unwrap();
    broker.delete_vhost("staging").await.unwrap();
    assert!(broker.permission("staging", "ops").is_err());
    assert_eq!(broker.permissions().len(), 1);
    broker.close().unwrap();

    // A vhost of the same name does not inherit the old permissions.
    let broker = open(dir.path());
    assert!(broker.permission("staging", "ops").is_err());
    broker.add_vhost("staging").await.unwrap();
    assert!(broker.check_vhost_access(&ops, "staging").is_err());
    assert_eq!(broker.permissions().len(), 1);
    broker.close().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_definitions_snapshot_keeps_users_and_permissions() {
    let dir = tempfile::tempdir().unwrap();
    let broker = open(dir.path());
    broker.put_user("app", Some("pw"), vec![]).await.unwrap();
    broker.delete_user("guest").await.unwrap();
    // Enough events for the next open to compact the log into a snapshot.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..1500 {
        let broker = broker.clone();
        tasks.spawn(async move {
            let p = Permissions::new(&format!("^c{i}$"), ".*", "").unwrap();
            broker.set_permissions("/", "app", p).await.unwrap();
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    broker
        .set_permissions("/", "app", Permissions::new("^final$", "", ".*").unwrap())
        .await
        .unwrap();
    broker.close().unwrap();
    let defs = dir.path().join("store/logs/definitions");
    let before = dir_bytes(&defs);
    for _ in 0..2 {
        let broker = open(dir.path());
        assert!(dir_bytes(&defs) < before, "the log was compacted");
        let names: Vec<String> = broker.users().iter().map(|u| u.name.to_string()).collect();
        assert_eq!(names, vec!["app"]);
        assert_eq!(
            broker.permission("/", "app").unwrap().permissions,
            Permissions::new("^final$", "", ".*").unwrap()
        );
        broker.authenticate("app", "pw", LOCAL).await.unwrap();
        broker.close().unwrap();
    }
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}
