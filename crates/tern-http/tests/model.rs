//! The API against a model: random sequences of declarations, deletions,
//! bindings, publishes, gets and purges over HTTP, each answer's status
//! compared with what a plain model of queues, exchanges and bindings
//! predicts, and the listings compared with the model after every step.

#![allow(clippy::unwrap_used)] // a test helper that fails should panic

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::TestServer;
use proptest::prelude::*;
use serde_json::{json, Value};

const QUEUES: usize = 2;
const EXCHANGES: usize = 2;
const KEYS: usize = 2;
const KINDS: [&str; 2] = ["direct", "fanout"];

#[derive(Debug, Clone)]
enum Op {
    PutQueue { q: usize, durable: bool },
    DeleteQueue { q: usize, if_empty: bool },
    Publish { q: usize },
    Purge { q: usize },
    Get { q: usize, count: u32, remove: bool },
    PutExchange { x: usize, kind: usize },
    DeleteExchange { x: usize, if_unused: bool },
    Bind { x: usize, q: usize, key: usize },
    Unbind { x: usize, q: usize, key: usize },
}

fn op() -> impl Strategy<Value = Op> {
    let q = 0..QUEUES;
    let x = 0..EXCHANGES;
    // Declaring and publishing are likelier, so that sequences reach
    // queues holding messages.
    prop_oneof![
        3 => (q.clone(), any::<bool>()).prop_map(|(q, durable)| Op::PutQueue { q, durable }),
        1 => (q.clone(), any::<bool>()).prop_map(|(q, if_empty)| Op::DeleteQueue { q, if_empty }),
        3 => q.clone().prop_map(|q| Op::Publish { q }),
        1 => q.clone().prop_map(|q| Op::Purge { q }),
        2 => (q.clone(), 1u32..4, any::<bool>()).prop_map(|(q, count, remove)| Op::Get {
            q,
            count,
            remove
        }),
        2 => (x.clone(), 0..KINDS.len()).prop_map(|(x, kind)| Op::PutExchange { x, kind }),
        1 => (x.clone(), any::<bool>()).prop_map(|(x, if_unused)| Op::DeleteExchange { x, if_unused }),
        2 => (x.clone(), q.clone(), 0..KEYS).prop_map(|(x, q, key)| Op::Bind { x, q, key }),
        1 => (x, q, 0..KEYS).prop_map(|(x, q, key)| Op::Unbind { x, q, key }),
    ]
}

/// What the broker should hold.
#[derive(Debug, Default)]
struct Model {
    /// Queue index to (durable, ready messages).
    queues: BTreeMap<usize, (bool, u64)>,
    /// Exchange index to its kind.
    exchanges: BTreeMap<usize, usize>,
    /// (exchange, queue, key).
    bindings: BTreeSet<(usize, usize, usize)>,
}

fn qn(q: usize) -> String {
    format!("q{q}")
}

fn xn(x: usize) -> String {
    format!("x{x}")
}

fn kn(k: usize) -> String {
    format!("k{k}")
}

/// Applies one operation over HTTP and to the model; checks the status.
async fn step(t: &TestServer, m: &mut Model, op: &Op) {
    let c = &t.client;
    let (status, want): (u16, u16) = match *op {
        Op::PutQueue { q, durable } => {
            let r = c
                .put(
                    &format!("/api/queues/%2F/{}", qn(q)),
                    json!({ "durable": durable }),
                )
                .await;
            let want = match m.queues.get(&q) {
                None => {
                    m.queues.insert(q, (durable, 0));
                    201
                }
                Some((d, _)) if *d == durable => 204,
                Some(_) => 409,
            };
            (r.status.as_u16(), want)
        }
        Op::DeleteQueue { q, if_empty } => {
            let r = c
                .delete(&format!("/api/queues/%2F/{}?if-empty={if_empty}", qn(q)))
                .await;
            let want = match m.queues.get(&q) {
                None => 404,
                Some((_, ready)) if if_empty && *ready > 0 => 409,
                Some(_) => {
                    m.queues.remove(&q);
                    m.bindings.retain(|b| b.1 != q);
                    204
                }
            };
            (r.status.as_u16(), want)
        }
        Op::Publish { q } => {
            let r = c
                .post(
                    "/api/exchanges/%2F/amq.default/publish",
                    json!({"routing_key": qn(q), "payload": "m"}),
                )
                .await;
            let routed = r.json()["routed"].as_bool().unwrap();
            let exists = m.queues.contains_key(&q);
            assert_eq!(routed, exists, "{op:?}: routed");
            if let Some((_, ready)) = m.queues.get_mut(&q) {
                *ready += 1;
            }
            (r.status.as_u16(), 200)
        }
        Op::Purge { q } => {
            let r = c
                .delete(&format!("/api/queues/%2F/{}/contents", qn(q)))
                .await;
            let want = match m.queues.get_mut(&q) {
                None => 404,
                Some((_, ready)) => {
                    *ready = 0;
                    204
                }
            };
            (r.status.as_u16(), want)
        }
        Op::Get { q, count, remove } => {
            let ackmode = if remove {
                "ack_requeue_false"
            } else {
                "ack_requeue_true"
            };
            let r = c
                .post(
                    &format!("/api/queues/%2F/{}/get", qn(q)),
                    json!({"count": count, "ackmode": ackmode}),
                )
                .await;
            let want = match m.queues.get_mut(&q) {
                None => 404,
                Some((_, ready)) => {
                    let n = u64::from(count).min(*ready);
                    assert_eq!(r.json().as_array().unwrap().len() as u64, n, "{op:?}");
                    if remove {
                        *ready -= n;
                    }
                    200
                }
            };
            (r.status.as_u16(), want)
        }
        Op::PutExchange { x, kind } => {
            let r = c
                .put(
                    &format!("/api/exchanges/%2F/{}", xn(x)),
                    json!({ "type": KINDS[kind] }),
                )
                .await;
            let want = match m.exchanges.get(&x) {
                None => {
                    m.exchanges.insert(x, kind);
                    201
                }
                Some(k) if *k == kind => 204,
                Some(_) => 409,
            };
            (r.status.as_u16(), want)
        }
        Op::DeleteExchange { x, if_unused } => {
            let r = c
                .delete(&format!(
                    "/api/exchanges/%2F/{}?if-unused={if_unused}",
                    xn(x)
                ))
                .await;
            let bound = m.bindings.iter().any(|b| b.0 == x);
            let want = if !m.exchanges.contains_key(&x) {
                404
            } else if if_unused && bound {
                409
            } else {
                m.exchanges.remove(&x);
                m.bindings.retain(|b| b.0 != x);
                204
            };
            (r.status.as_u16(), want)
        }
        Op::Bind { x, q, key } => {
            let r = c
                .post(
                    &format!("/api/bindings/%2F/e/{}/q/{}", xn(x), qn(q)),
                    json!({ "routing_key": kn(key) }),
                )
                .await;
            let want = if m.exchanges.contains_key(&x) && m.queues.contains_key(&q) {
                m.bindings.insert((x, q, key));
                201
            } else {
                404
            };
            (r.status.as_u16(), want)
        }
        Op::Unbind { x, q, key } => {
            let r = c
                .delete(&format!(
                    "/api/bindings/%2F/e/{}/q/{}/{}",
                    xn(x),
                    qn(q),
                    kn(key)
                ))
                .await;
            let want = if m.bindings.remove(&(x, q, key)) {
                204
            } else {
                404
            };
            (r.status.as_u16(), want)
        }
    };
    assert_eq!(status, want, "{op:?}");
}

/// The listings agree with the model.
async fn check(t: &TestServer, m: &Model) {
    let queues = t.client.get("/api/queues/%2F").await.json();
    let got: Vec<(String, bool, u64)> = queues
        .as_array()
        .unwrap()
        .iter()
        .map(|q| {
            (
                q["name"].as_str().unwrap().to_string(),
                q["durable"].as_bool().unwrap(),
                q["messages_ready"].as_u64().unwrap(),
            )
        })
        .collect();
    let want: Vec<(String, bool, u64)> = m
        .queues
        .iter()
        .map(|(q, (durable, ready))| (qn(*q), *durable, *ready))
        .collect();
    assert_eq!(got, want, "queues");

    let exchanges = t.client.get("/api/exchanges/%2F?name=x").await.json();
    let got: Vec<(String, String)> = exchanges
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_string(),
                e["type"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want: Vec<(String, String)> = m
        .exchanges
        .iter()
        .map(|(x, k)| (xn(*x), KINDS[*k].to_string()))
        .collect();
    assert_eq!(got, want, "exchanges");

    let bindings: Value = t.client.get("/api/bindings/%2F").await.json();
    let got: BTreeSet<(String, String, String)> = bindings
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["source"].as_str().unwrap().to_string(),
                b["destination"].as_str().unwrap().to_string(),
                b["routing_key"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want: BTreeSet<(String, String, String)> = m
        .bindings
        .iter()
        .map(|(x, q, k)| (xn(*x), qn(*q), kn(*k)))
        .collect();
    assert_eq!(got, want, "bindings");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn the_api_agrees_with_a_model(ops in proptest::collection::vec(op(), 1..40)) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let t = TestServer::start().await;
            let mut m = Model::default();
            for op in &ops {
                step(&t, &mut m, op).await;
                check(&t, &m).await;
            }
        });
    }
}
