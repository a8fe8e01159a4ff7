//! Users, permissions and vhosts over the API, as RabbitMQ's management
//! plugin shapes them: an administrator manages them, everyone else gets
//! 403; passwords and hashes never appear in a response; a user created
//! here logs in here and over the broker's API at once.

#![allow(clippy::unwrap_used)] // a test helper that fails should panic

mod common;

use base64::Engine;
use common::{Client, TestServer};
use serde_json::json;

fn basic(client: &Client, user: &str, password: &str) -> Client {
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    client.with_auth(Some(&format!("Basic {token}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_administrator_manages_users() {
    let t = TestServer::start().await;
    let users = t.client.get("/api/users").await.expect(200).json();
    assert_eq!(
        users,
        json!([{"name": "guest", "tags": ["administrator"], "has_password": true}])
    );
    t.client
        .put(
            "/api/users/ann",
            json!({"password": "s3cret", "tags": "management,monitoring"}),
        )
        .await
        .expect(201);
    let ann = t.client.get("/api/users/ann").await;
    ann.expect(200);
    assert_eq!(
        ann.json(),
        json!({"name": "ann", "tags": ["management", "monitoring"], "has_password": true})
    );
    let all = t.client.get("/api/users").await;
    all.expect(200);
    let text = String::from_utf8_lossy(&all.body).to_string();
    assert!(
        !text.contains("s3cret") && !text.contains("argon2"),
        "{text}"
    );
    // ann logs in with her password, and only with it.
    let as_ann = basic(&t.client, "ann", "s3cret");
    as_ann.get("/api/overview").await.expect(200);
    basic(&t.client, "ann", "guess")
        .get("/api/overview")
        .await
        .expect(401);
    // Replacing without a password keeps it; tags as a list work too.
    t.client
        .put("/api/users/ann", json!({"tags": ["administrator"]}))
        .await
        .expect(204);
    let me = as_ann.get("/api/whoami").await.expect(200).json();
    assert_eq!(me, json!({"name": "ann", "tags": ["administrator"]}));
    // A new password replaces the old one.
    t.client
        .put("/api/users/ann", json!({"password": "n3w", "tags": ""}))
        .await
        .expect(204);
    as_ann.get("/api/overview").await.expect(401);
    // Bad requests name the problem.
    let r = t
        .client
        .put("/api/users/bob", json!({"password": "x", "tags": "root"}))
        .await;
    r.expect(400);
    assert_eq!(r.error(), "invalid_tag");
    let r = t
        .client
        .put("/api/users/bob", json!({"password": "", "tags": ""}))
        .await;
    r.expect(400);
    let r = t
        .client
        .put("/api/users/bob", json!({"passwd": "x", "tags": ""}))
        .await;
    r.expect(400);
    assert!(t.broker.user("bob").is_err());
    // Delete.
    t.client.delete("/api/users/ann").await.expect(204);
    let r = t.client.delete("/api/users/ann").await;
    r.expect(404);
    assert!(r.json()["reason"].as_str().unwrap().contains("'ann'"));
    t.client.get("/api/users/ann").await.expect(404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_administrator_manages_permissions_and_vhosts() {
    let t = TestServer::start().await;
    t.client
        .put(
            "/api/users/ann",
            json!({"password": "pw", "tags": "management"}),
        )
        .await
        .expect(201);
    t.client
        .put("/api/vhosts/staging", json!({}))
        .await
        .expect(201);
    let body = json!({"configure": "^ann\\.", "write": ".*", "read": ""});
    t.client
        .put("/api/permissions/staging/ann", body.clone())
        .await
        .expect(201);
    t.client
        .put("/api/permissions/staging/ann", body)
        .await
        .expect(204);
    let p = t
        .client
        .get("/api/permissions/staging/ann")
        .await
        .expect(200)
        .json();
    assert_eq!(
        p,
        json!({"user": "ann", "vhost": "staging", "configure": "^ann\\.", "write": ".*", "read": ""})
    );
    let all = t.client.get("/api/permissions").await.expect(200).json();
    assert_eq!(all.as_array().unwrap().len(), 2, "{all}");
    let mine = t
        .client
        .get("/api/users/ann/permissions")
        .await
        .expect(200)
        .json();
    assert_eq!(mine, json!([p]));
    let staging = t
        .client
        .get("/api/vhosts/staging/permissions")
        .await
        .expect(200)
        .json();
    assert_eq!(staging, json!([p]));
    t.client
        .get("/api/users/nobody/permissions")
        .await
        .expect(404);
    t.client
        .get("/api/vhosts/nowhere/permissions")
        .await
        .expect(404);
    // The broker enforces what was set.
    let ann = t.broker.authenticate("ann", "pw", None).await.unwrap();
    t.broker.check_vhost_access(&ann, "staging").unwrap();
    assert!(t.broker.check_vhost_access(&ann, "/").is_err());
    // Bad patterns, unknown users and vhosts, missing fields.
    let r = t
        .client
        .put(
            "/api/permissions/staging/ann",
            json!({"configure": "(", "write": "", "read": ""}),
        )
        .await;
    r.expect(400);
    assert_eq!(r.error(), "invalid_pattern");
    t.client
        .put(
            "/api/permissions/staging/nobody",
            json!({"configure": "", "write": "", "read": ""}),
        )
        .await
        .expect(404);
    t.client
        .put(
            "/api/permissions/nowhere/ann",
            json!({"configure": "", "write": "", "read": ""}),
        )
        .await
        .expect(404);
    t.client
        .put("/api/permissions/staging/ann", json!({"configure": ""}))
        .await
        .expect(400);
    // Deleting the vhost takes its permissions.
    t.client.delete("/api/vhosts/staging").await.expect(204);
    t.client
        .get("/api/permissions/staging/ann")
        .await
        .expect(404);
    t.client
        .delete("/api/permissions/%2F/guest")
        .await
        .expect(204);
    t.client
        .delete("/api/permissions/%2F/guest")
        .await
        .expect(404);
    assert!(t.broker.permissions().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_users_get_403_on_administrator_endpoints() {
    let t = TestServer::start().await;
    t.client
        .put(
            "/api/users/mon",
            json!({"password": "pw", "tags": "monitoring"}),
        )
        .await
        .expect(201);
    let mon = basic(&t.client, "mon", "pw");
    // Reading the broker is fine.
    mon.get("/api/overview").await.expect(200);
    mon.get("/api/vhosts").await.expect(200);
    mon.get("/api/whoami").await.expect(200);
    let denied = [
        ("GET", "/api/users", None),
        ("GET", "/api/users/guest", None),
        (
            "PUT",
            "/api/users/evil",
            Some(json!({"password": "x", "tags": "administrator"})),
        ),
        ("DELETE", "/api/users/guest", None),
        ("GET", "/api/permissions", None),
        ("GET", "/api/users/guest/permissions", None),
        ("GET", "/api/vhosts/%2F/permissions", None),
        ("GET", "/api/permissions/%2F/guest", None),
        (
            "PUT",
            "/api/permissions/%2F/mon",
            Some(json!({"configure": ".*", "write": ".*", "read": ".*"})),
        ),
        ("DELETE", "/api/permissions/%2F/guest", None),
        ("PUT", "/api/vhosts/mine", Some(json!({}))),
        ("DELETE", "/api/vhosts/%2F", None),
    ];
    for (method, path, body) in denied {
        let body = body.map(|b| b.to_string().into_bytes());
        let r = mon.raw(method, path, body.as_deref()).await;
        assert_eq!(r.status.as_u16(), 403, "{method} {path}");
        assert_eq!(r.error(), "access_refused", "{method} {path}");
        assert!(
            r.json()["reason"].as_str().unwrap().contains("'mon'"),
            "{method} {path}"
        );
    }
    // Nothing changed.
    assert!(t.broker.user("evil").is_err());
    assert!(t.broker.user("guest").is_ok());
    assert_eq!(t.broker.permissions().len(), 1);
    assert_eq!(t.broker.vhosts().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_users_read_only_the_vhosts_they_may_access_and_change_nothing_elsewhere() {
    let t = TestServer::start().await;
    t.client
        .put("/api/vhosts/staging", json!({}))
        .await
        .expect(201);
    t.client
        .put("/api/queues/staging/secret", json!({}))
        .await
        .expect(201);
    t.client
        .put("/api/queues/%2F/mine", json!({}))
        .await
        .expect(201);
    t.client
        .put(
            "/api/users/ann",
            json!({"password": "pw", "tags": "management"}),
        )
        .await
        .expect(201);
    t.client
        .put(
            "/api/permissions/%2F/ann",
            json!({"configure": ".*", "write": ".*", "read": ".*"}),
        )
        .await
        .expect(201);
    let ann = basic(&t.client, "ann", "pw");
    ann.get("/api/queues/%2F").await.expect(200);
    ann.get("/api/queues/%2F/mine").await.expect(200);
    ann.get("/api/vhosts/%2F").await.expect(200);
    for path in [
        "/api/queues/staging",
        "/api/queues/staging/secret",
        "/api/queues/staging/secret/messages?peek=1",
        "/api/exchanges/staging",
        "/api/bindings/staging",
        "/api/consumers/staging",
        "/api/vhosts/staging",
    ] {
        let r = ann.get(path).await;
        assert_eq!(r.status.as_u16(), 403, "{path}");
        assert!(
            r.json()["reason"]
                .as_str()
                .unwrap()
                .contains("refused for user 'ann'"),
            "{path}"
        );
    }
    // A vhost that does not exist is 404, as for anyone.
    ann.get("/api/queues/nowhere").await.expect(404);
    // Changes in another vhost are refused before anything is looked up
    // (`tests/scope.rs` covers changes within her permissions).
    for (method, path) in [
        ("PUT", "/api/queues/staging/more"),
        ("DELETE", "/api/queues/staging/secret"),
        ("DELETE", "/api/queues/staging/secret/contents"),
        ("POST", "/api/exchanges/staging/amq.default/publish"),
    ] {
        let r = ann.raw(method, path, Some(b"{}")).await;
        assert_eq!(r.status.as_u16(), 403, "{method} {path}");
        assert_eq!(r.error(), "access_refused");
    }
    assert!(t.broker.queue_info("staging", "secret").is_ok());
    assert!(t.broker.queue_info("staging", "more").is_err());
}
