//! Super streams (`x-super-stream` exchanges over partition streams) and
//! consumer groups through the broker's in-process API: declaration,
//! refusals and deletion; property tests against a model of routing (a
//! key's partition, stable across a restart) and of group assignment (after
//! any joins and leaves, one active member per partition, members in
//! arrival order, balanced within one); and hand-over without loss or
//! reordering when the active member goes or a new one takes its partition.

#![allow(clippy::unwrap_used)] // a test helper that fails should panic

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use tern_broker::super_stream::{partition_of, PARTITIONS_ARGUMENT, PARTITION_KEY_HEADER_ARGUMENT};
use tern_broker::*;

fn s(v: &str) -> FieldValue {
    FieldValue::String(v.into())
}

fn super_stream(name: &str, partitions: i64, args: &[(&str, FieldValue)]) -> ExchangeDeclare {
    let mut d = ExchangeDeclare::new(name, ExchangeKind::Direct);
    d.kind = "x-super-stream".into();
    d.arguments
        .insert(PARTITIONS_ARGUMENT.into(), FieldValue::I64(partitions));
    for (k, v) in args {
        d.arguments.insert(k.to_string(), v.clone());
    }
    d
}

fn keyed(exchange: &str, key: &str, body: &str, header: Option<(&str, &str)>) -> Message {
    let mut properties = Properties::default();
    if let Some((h, v)) = header {
        properties.headers = Some([(h.to_string(), s(v))].into_iter().collect());
    }
    Message {
        exchange: ExchangeName::new(exchange).unwrap(),
        routing_key: key.to_string(),
        properties,
        body: Bytes::copy_from_slice(body.as_bytes()),
    }
}

async fn publish(broker: &Broker, m: Message) {
    let published = broker.publish("/", m).unwrap();
    assert_eq!(published.routed, 1);
    published.confirmed().await.unwrap();
}

fn group_args(group: &str) -> ConsumeOptions {
    ConsumeOptions {
        arguments: [
            (
                "x-single-active-consumer".to_string(),
                FieldValue::Bool(true),
            ),
            ("x-stream-consumer-name".to_string(), s(group)),
            ("x-stream-offset".to_string(), s("first")),
        ]
        .into_iter()
        .collect(),
        ..ConsumeOptions::default()
    }
}

async fn next_delivery(ch: &mut Channel) -> Delivery {
    match tokio::time::timeout(Duration::from_secs(5), ch.recv()).await {
        Ok(Some(ChannelEvent::Delivery(d))) => d,
        other => panic!("expected a delivery, got {other:?}"),
    }
}

async fn no_delivery(ch: &mut Channel) {
    if let Ok(ev) = tokio::time::timeout(Duration::from_millis(100), ch.recv()).await {
        panic!("expected no delivery, got {ev:?}");
    }
}

fn body(d: &Delivery) -> String {
    String::from_utf8(d.message.body.to_vec()).unwrap()
}

fn refused(e: BrokerError, needle: &str) {
    assert_eq!(e.reply_code(), ReplyCode::PreconditionFailed, "{e}");
    assert!(e.to_string().contains(needle), "{e} should name {needle}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declaring_creates_bound_partitions_and_deleting_removes_them() {
    let dir = tempfile::tempdir().unwrap();
    {
        let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
        broker
            .declare_exchange("/", super_stream("orders", 3, &[("x-max-age", s("7D"))]))
            .await
            .unwrap();
        // A redeclaration with the same arguments is fine; another count is not.
        broker
            .declare_exchange("/", super_stream("orders", 3, &[("x-max-age", s("7D"))]))
            .await
            .unwrap();
        refused(
            broker
                .declare_exchange("/", super_stream("orders", 4, &[("x-max-age", s("7D"))]))
                .await
                .unwrap_err(),
            "x-partitions",
        );
        broker.close().unwrap();
    }
    // Everything survives a restart.
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let info = broker.exchange_info("/", "orders").unwrap();
    assert_eq!(info.type_name, "x-super-stream");
    for i in 0..3 {
        let q = broker.queue_info("/", &format!("orders-{i}")).unwrap();
        assert_eq!(q.queue_type, QueueType::Stream);
        assert_eq!(q.arguments.get("x-max-age"), Some(&s("7D")));
        assert_eq!(
            q.arguments.get("x-super-stream-partition"),
            Some(&FieldValue::I64(i))
        );
    }
    let mut keys: Vec<(String, String)> = broker
        .bindings("/")
        .unwrap()
        .into_iter()
        .filter(|b| b.source.as_str() == "orders")
        .map(|b| (b.routing_key, b.destination.to_string()))
        .collect();
    keys.sort();
    assert_eq!(keys.len(), 3);
    for (i, (key, dest)) in keys.iter().enumerate() {
        assert_eq!(key, &i.to_string());
        assert!(dest.contains(&format!("orders-{i}")), "{dest}");
    }
    let ss = broker.super_stream("/", "orders").unwrap();
    assert_eq!(ss.partitions.len(), 3);
    assert!(ss
        .partitions
        .iter()
        .all(|p| p.exists && p.groups.is_empty()));

    broker.delete_exchange("/", "orders", false).await.unwrap();
    for i in 0..3 {
        assert_eq!(
            broker
                .queue_info("/", &format!("orders-{i}"))
                .unwrap_err()
                .reply_code(),
            ReplyCode::NotFound
        );
    }
    broker.close().unwrap();
    // And the deletion is durable.
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    assert!(broker.queue_info("/", "orders-0").is_err());
    assert!(broker.exchange_info("/", "orders").is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_declarations_are_refused_naming_the_problem_and_create_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let conn = broker.new_connection_id();
    let mut no_count = super_stream("s", 1, &[]);
    no_count.arguments.remove(PARTITIONS_ARGUMENT);
    refused(
        broker.declare_exchange("/", no_count).await.unwrap_err(),
        "x-partitions",
    );
    for bad in [FieldValue::I64(0), FieldValue::I64(1001), s("3")] {
        let mut d = super_stream("s", 1, &[]);
        d.arguments.insert(PARTITIONS_ARGUMENT.into(), bad);
        refused(
            broker.declare_exchange("/", d).await.unwrap_err(),
            "x-partitions",
        );
    }
    refused(
        broker
            .declare_exchange(
                "/",
                super_stream(
                    "s",
                    2,
                    &[(PARTITION_KEY_HEADER_ARGUMENT, FieldValue::I32(1))],
                ),
            )
            .await
            .unwrap_err(),
        PARTITION_KEY_HEADER_ARGUMENT,
    );
    refused(
        broker
            .declare_exchange("/", super_stream("s", 2, &[("x-max-age", s("7X"))]))
            .await
            .unwrap_err(),
        "x-max-age",
    );
    let mut d = super_stream("s", 2, &[]);
    d.durable = false;
    refused(
        broker.declare_exchange("/", d).await.unwrap_err(),
        "non-durable",
    );
    let mut d = super_stream("s", 2, &[]);
    d.auto_delete = true;
    refused(
        broker.declare_exchange("/", d).await.unwrap_err(),
        "auto-delete",
    );
    // A queue in the way of partition 1: refused, and partition 0 is not left behind.
    broker
        .declare_queue("/", QueueDeclare::new("s-1"), conn)
        .await
        .unwrap();
    refused(
        broker
            .declare_exchange("/", super_stream("s", 3, &[]))
            .await
            .unwrap_err(),
        "s-1",
    );
    assert!(broker.queue_info("/", "s-0").is_err());
    assert!(broker.exchange_info("/", "s").is_err());
    // Not a super stream.
    refused(
        broker.super_stream("/", "amq.direct").unwrap_err(),
        "not a super stream",
    );
    // Group members must be named, and names are not shared outside a group.
    broker
        .declare_exchange("/", super_stream("t", 1, &[]))
        .await
        .unwrap();
    let mut ch = broker.open_channel("/", conn).unwrap();
    ch.qos(10, false);
    let mut unnamed = group_args("g");
    unnamed.arguments.remove("x-stream-consumer-name");
    refused(
        ch.consume("t-0", unnamed).unwrap_err(),
        "x-single-active-consumer",
    );
    let mut not_bool = group_args("g");
    not_bool
        .arguments
        .insert("x-single-active-consumer".into(), s("yes"));
    refused(
        ch.consume("t-0", not_bool).unwrap_err(),
        "x-single-active-consumer",
    );
    ch.consume("t-0", group_args("g")).unwrap();
    let mut plain = group_args("g");
    plain.arguments.remove("x-single-active-consumer");
    refused(ch.consume("t-0", plain).unwrap_err(), "'g'");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_header_picks_the_partition_when_present() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    broker
        .declare_exchange(
            "/",
            super_stream("h", 5, &[(PARTITION_KEY_HEADER_ARGUMENT, s("customer"))]),
        )
        .await
        .unwrap();
    let mut expected = [0u64; 5];
    for i in 0..40 {
        let customer = format!("c{i}");
        let rk = format!("rk{}", i * 7);
        if i % 2 == 0 {
            publish(&broker, keyed("h", &rk, "x", Some(("customer", &customer)))).await;
            expected[partition_of(customer.as_bytes(), 5) as usize] += 1;
        } else {
            // Without the header, the routing key is the key.
            publish(&broker, keyed("h", &rk, "x", None)).await;
            expected[partition_of(rk.as_bytes(), 5) as usize] += 1;
        }
    }
    for (i, n) in expected.iter().enumerate() {
        assert_eq!(broker.queue_info("/", &format!("h-{i}")).unwrap().ready, *n);
    }
}

fn run_routing_model(partitions: u32, keys: &[String]) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let mut model: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        for round in 0..2 {
            // The second round runs after a restart: every key must still
            // land where the model (and the first round) put it.
            let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
            broker
                .declare_exchange("/", super_stream("r", i64::from(partitions), &[]))
                .await
                .unwrap();
            for (i, key) in keys.iter().enumerate() {
                let body = format!("{round}:{i}");
                publish(&broker, keyed("r", key, &body, None)).await;
                model
                    .entry(partition_of(key.as_bytes(), partitions))
                    .or_default()
                    .push(body);
            }
            // Read every partition back: exactly the model's messages, in order.
            let conn = broker.new_connection_id();
            let mut ch = broker.open_channel("/", conn).unwrap();
            ch.qos(1000, false);
            for p in 0..partitions {
                let queue = format!("r-{p}");
                let want = model.get(&p).cloned().unwrap_or_default();
                assert_eq!(
                    broker.queue_info("/", &queue).unwrap().ready,
                    want.len() as u64
                );
                let tag = ch
                    .consume(
                        &queue,
                        ConsumeOptions {
                            arguments: [("x-stream-offset".to_string(), s("first"))]
                                .into_iter()
                                .collect(),
                            ..ConsumeOptions::default()
                        },
                    )
                    .unwrap();
                for w in &want {
                    let d = next_delivery(&mut ch).await;
                    assert_eq!(&body(&d), w);
                    ch.ack(d.tag, false).unwrap();
                }
                no_delivery(&mut ch).await;
                ch.cancel(&tag);
            }
            drop(ch);
            broker.close().unwrap();
        }
    });
}

/// One step of the group model: a member joins (attaching to every
/// partition, as a client instance does) or the member at an index leaves
/// (its channel closes).
#[derive(Debug, Clone)]
enum GroupOp {
    Join,
    Leave(usize),
}

fn group_op() -> impl Strategy<Value = GroupOp> {
    prop_oneof![2 => Just(GroupOp::Join), 1 => (0usize..8).prop_map(GroupOp::Leave)]
}

fn run_group_model(partitions: u32, ops: &[GroupOp]) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
        broker
            .declare_exchange("/", super_stream("g", i64::from(partitions), &[]))
            .await
            .unwrap();
        let conn = broker.new_connection_id();
        // The model: members in arrival order, each with its channel.
        let mut members: Vec<(String, Channel)> = Vec::new();
        let mut joined = 0;
        for op in ops {
            match op {
                GroupOp::Join => {
                    let name = format!("m{joined}");
                    joined += 1;
                    let mut ch = broker.open_channel("/", conn).unwrap();
                    ch.qos(10, false);
                    for p in 0..partitions {
                        let mut opts = group_args("workers");
                        opts.consumer_tag = format!("{name}.{p}");
                        ch.consume(&format!("g-{p}"), opts).unwrap();
                    }
                    members.push((name, ch));
                }
                GroupOp::Leave(i) => {
                    if members.is_empty() {
                        continue;
                    }
                    let (_, ch) = members.remove(i % members.len());
                    drop(ch);
                }
            }
            // Partition p's active member is members[p mod count]. A leave
            // hands over from the stream's task, so wait for it to settle.
            let expected: Vec<Option<String>> = (0..partitions)
                .map(|p| {
                    (!members.is_empty())
                        .then(|| format!("{}.{p}", members[p as usize % members.len()].0))
                })
                .collect();
            let mut seen = Vec::new();
            for _ in 0..500 {
                let info = broker.super_stream("/", "g").unwrap();
                seen = info
                    .partitions
                    .iter()
                    .map(|p| {
                        let g = p.groups.iter().find(|g| g.group.as_str() == "workers");
                        let want_members: Vec<String> = members
                            .iter()
                            .map(|(n, _)| format!("{n}.{}", p.index))
                            .collect();
                        assert_eq!(
                            g.map(|g| g.members.clone()).unwrap_or_default(),
                            want_members,
                            "members of partition {} in arrival order",
                            p.index
                        );
                        g.and_then(|g| g.active.clone())
                    })
                    .collect();
                if seen == expected {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(seen, expected);
            // Balanced: each member holds the same number of partitions, give or take one.
            if !members.is_empty() {
                let counts: Vec<usize> = members
                    .iter()
                    .map(|(n, _)| {
                        seen.iter()
                            .flatten()
                            .filter(|t| t.starts_with(&format!("{n}.")))
                            .count()
                    })
                    .collect();
                let (lo, hi) = (*counts.iter().min().unwrap(), *counts.iter().max().unwrap());
                assert!(hi - lo <= 1, "unbalanced: {counts:?}");
                assert_eq!(counts.iter().sum::<usize>(), partitions as usize);
            }
        }
    });
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 12,
        ..ProptestConfig::default()
    })]

    #[test]
    fn keys_route_to_their_hash_partition_across_a_restart(
        partitions in 1u32..6,
        keys in prop::collection::vec("[a-z0-9]{0,8}", 1..30),
    ) {
        run_routing_model(partitions, &keys);
    }

    #[test]
    fn each_partition_has_one_active_member_and_the_group_is_balanced(
        partitions in 1u32..7,
        ops in prop::collection::vec(group_op(), 1..14),
    ) {
        run_group_model(partitions, &ops);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_member_takes_over_only_after_in_flight_messages_are_settled() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    // One partition: the first member in arrival order holds it.
    broker
        .declare_exchange("/", super_stream("one", 1, &[]))
        .await
        .unwrap();
    for i in 0..6 {
        publish(&broker, keyed("one", "k", &format!("m{i}"), None)).await;
    }
    let conn = broker.new_connection_id();
    let mut a = broker.open_channel("/", conn).unwrap();
    a.qos(2, false);
    a.consume("one-0", group_args("g")).unwrap();
    let a0 = next_delivery(&mut a).await;
    let a1 = next_delivery(&mut a).await;
    assert_eq!((body(&a0), body(&a1)), ("m0".into(), "m1".into()));
    a.ack(a0.tag, false).unwrap();
    let a2 = next_delivery(&mut a).await;
    assert_eq!(body(&a2), "m2");
    let mut b = broker.open_channel("/", conn).unwrap();
    b.qos(10, false);
    b.consume("one-0", group_args("g")).unwrap();
    // B waits: A stays the active member (partition 0, index 0 of [A, B]).
    no_delivery(&mut b).await;
    // A goes with m1 and m2 unacked: B resumes at the commit, m1, in order.
    drop(a);
    for want in ["m1", "m2", "m3", "m4", "m5"] {
        let d = next_delivery(&mut b).await;
        assert_eq!(body(&d), want);
        b.ack(d.tag, false).unwrap();
    }
    no_delivery(&mut b).await;
    let info = broker.super_stream("/", "one").unwrap();
    assert_eq!(info.partitions[0].groups[0].committed, Some(6));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_waits_for_the_previous_member_to_finish() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    // Two partitions; only partition 1 is used: with members [A, B] it moves to B.
    broker
        .declare_exchange("/", super_stream("two", 2, &[]))
        .await
        .unwrap();
    let key = (0..)
        .map(|i| format!("k{i}"))
        .find(|k| partition_of(k.as_bytes(), 2) == 1)
        .unwrap();
    for i in 0..4 {
        publish(&broker, keyed("two", &key, &format!("m{i}"), None)).await;
    }
    let conn = broker.new_connection_id();
    let mut a = broker.open_channel("/", conn).unwrap();
    a.qos(2, false);
    a.consume("two-1", group_args("g")).unwrap();
    let a0 = next_delivery(&mut a).await;
    let a1 = next_delivery(&mut a).await;
    let mut b = broker.open_channel("/", conn).unwrap();
    b.qos(10, false);
    b.consume("two-1", group_args("g")).unwrap();
    // B is due the partition, but A still holds m0 and m1: nobody gets more.
    no_delivery(&mut b).await;
    a.ack(a0.tag, false).unwrap();
    no_delivery(&mut a).await;
    no_delivery(&mut b).await;
    a.ack(a1.tag, false).unwrap();
    // A finished: B starts where A's acks committed.
    for want in ["m2", "m3"] {
        let d = next_delivery(&mut b).await;
        assert_eq!(body(&d), want);
        b.ack(d.tag, false).unwrap();
    }
    no_delivery(&mut a).await;
    let info = broker.super_stream("/", "two").unwrap();
    let g = &info.partitions[1].groups[0];
    assert_eq!(g.active.as_deref(), Some(g.members[1].as_str()));
}
