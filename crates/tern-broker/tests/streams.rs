//! Stream queues (`x-queue-type: stream`) through the broker's in-process
//! API: a property test against a model (appends, consumers attaching at
//! every offset spec, named consumers detaching and resuming from their
//! committed offset, reads), and integration tests for declaration errors,
//! the refusals RabbitMQ makes, retention by bytes and by age (with the
//! clock passed in), and committed offsets surviving a restart.

#![allow(clippy::unwrap_used)] // a test helper that fails should panic

use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use tern_broker::*;

fn message(key: &str, body: &str) -> Message {
    Message {
        exchange: ExchangeName::default_exchange(),
        routing_key: key.to_string(),
        properties: Properties::default(),
        body: Bytes::copy_from_slice(body.as_bytes()),
    }
}

async fn publish(broker: &Broker, key: &str, body: &str) {
    let published = broker.publish("/", message(key, body)).unwrap();
    assert_eq!(published.routed, 1);
    published.confirmed().await.unwrap();
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

fn offset_header(d: &Delivery) -> i64 {
    match d
        .message
        .properties
        .headers
        .as_ref()
        .and_then(|h| h.get("x-stream-offset"))
    {
        Some(FieldValue::I64(o)) => *o,
        other => panic!("expected an x-stream-offset long, got {other:?}"),
    }
}

fn stream(name: &str, args: &[(&str, FieldValue)]) -> QueueDeclare {
    let mut d = QueueDeclare::new(name);
    d.arguments
        .insert("x-queue-type".into(), FieldValue::String("stream".into()));
    for (k, v) in args {
        d.arguments.insert(k.to_string(), v.clone());
    }
    d
}

fn consume_args(args: &[(&str, FieldValue)]) -> ConsumeOptions {
    ConsumeOptions {
        arguments: args
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
        ..ConsumeOptions::default()
    }
}

fn s(v: &str) -> FieldValue {
    FieldValue::String(v.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declarations_are_checked_as_rabbitmq_checks_them() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let conn = broker.new_connection_id();
    let refused = |e: BrokerError, needle: &str| {
        assert_eq!(e.reply_code(), ReplyCode::PreconditionFailed, "{e}");
        assert!(e.to_string().contains(needle), "{e} should name {needle}");
    };
    let mut d = stream("s", &[]);
    d.durable = false;
    refused(
        broker.declare_queue("/", d, conn).await.unwrap_err(),
        "non-durable",
    );
    let mut d = stream("s", &[]);
    d.exclusive = true;
    refused(
        broker.declare_queue("/", d, conn).await.unwrap_err(),
        "exclusive",
    );
    let mut d = stream("s", &[]);
    d.auto_delete = true;
    refused(
        broker.declare_queue("/", d, conn).await.unwrap_err(),
        "auto-delete",
    );
    for (arg, value) in [
        ("x-max-age", s("7X")),
        ("x-max-age", s("0s")),
        ("x-max-age", FieldValue::I32(5)),
        ("x-max-length-bytes", FieldValue::I64(-5)),
        ("x-max-length-bytes", s("x")),
        ("x-stream-max-segment-size-bytes", s("x")),
        ("x-message-ttl", FieldValue::I32(5)),
        ("x-max-length", FieldValue::I32(5)),
        ("x-dead-letter-exchange", s("dlx")),
        ("x-max-priority", FieldValue::I32(5)),
        ("x-single-active-consumer", FieldValue::Bool(true)),
        ("x-expires", FieldValue::I32(5000)),
        ("x-overflow", s("reject-publish")),
        ("x-delivery-limit", FieldValue::I32(3)),
        ("x-queue-mode", s("lazy")),
    ] {
        let e = broker
            .declare_queue("/", stream("s", &[(arg, value.clone())]), conn)
            .await
            .unwrap_err();
        refused(e, arg);
    }
    let ok = stream(
        "s",
        &[
            ("x-max-age", s("7D")),
            ("x-max-length-bytes", FieldValue::I64(1 << 30)),
            ("x-stream-max-segment-size-bytes", FieldValue::I32(1 << 20)),
            ("x-made-up", s("ignored, as RabbitMQ does")),
        ],
    );
    broker.declare_queue("/", ok.clone(), conn).await.unwrap();
    // Redeclaring with different retention is inequivalent.
    let e = broker
        .declare_queue("/", stream("s", &[("x-max-age", s("1D"))]), conn)
        .await
        .unwrap_err();
    assert!(matches!(e, BrokerError::Inequivalent { .. }), "{e}");
    broker.declare_queue("/", ok, conn).await.unwrap();
    assert_eq!(
        broker.queue_info("/", "s").unwrap().queue_type,
        QueueType::Stream
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_purge_automatic_acks_and_missing_prefetch_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let conn = broker.new_connection_id();
    broker
        .declare_queue("/", stream("s", &[]), conn)
        .await
        .unwrap();
    publish(&broker, "s", "m0").await;
    let mut ch = broker.open_channel("/", conn).unwrap();
    let e = ch.get("s", false).unwrap_err();
    assert_eq!(e.reply_code(), ReplyCode::NotImplemented, "{e}");
    assert!(e
        .to_string()
        .contains("basic.get not supported by stream queues"));
    let e = broker.purge_queue("/", "s", conn).unwrap_err();
    assert_eq!(e.reply_code(), ReplyCode::NotImplemented, "{e}");
    let e = ch.consume("s", ConsumeOptions::default()).unwrap_err();
    assert_eq!(e.reply_code(), ReplyCode::PreconditionFailed, "{e}");
    assert!(
        e.to_string().contains("consumer prefetch count is not set"),
        "{e}"
    );
    ch.qos(10, true);
    let e = ch.consume("s", ConsumeOptions::default()).unwrap_err();
    assert_eq!(e.reply_code(), ReplyCode::PreconditionFailed, "{e}");
    ch.qos(10, false);
    let e = ch
        .consume(
            "s",
            ConsumeOptions {
                no_ack: true,
                ..ConsumeOptions::default()
            },
        )
        .unwrap_err();
    assert_eq!(e.reply_code(), ReplyCode::NotImplemented, "{e}");
    let e = ch
        .consume("s", consume_args(&[("x-stream-offset", s("1x"))]))
        .unwrap_err();
    assert!(e.to_string().contains("x-stream-offset"), "{e}");
    // A queue that is not a stream has no offsets to show.
    broker
        .declare_queue("/", QueueDeclare::new("plain"), conn)
        .await
        .unwrap();
    assert!(broker.stream_offsets("/", "plain").is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_are_independent_and_nothing_is_consumed_away() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let conn = broker.new_connection_id();
    broker
        .declare_queue("/", stream("s", &[]), conn)
        .await
        .unwrap();
    for i in 0..5 {
        publish(&broker, "s", &format!("m{i}")).await;
    }
    let mut a = broker.open_channel("/", conn).unwrap();
    let mut b = broker.open_channel("/", conn).unwrap();
    a.qos(2, false);
    b.qos(10, false);
    a.consume("s", consume_args(&[("x-stream-offset", s("first"))]))
        .unwrap();
    b.consume(
        "s",
        consume_args(&[("x-stream-offset", FieldValue::I64(3))]),
    )
    .unwrap();
    // Prefetch 2: two deliveries, then nothing until an ack grants credit.
    let d0 = next_delivery(&mut a).await;
    let d1 = next_delivery(&mut a).await;
    assert_eq!((body(&d0), offset_header(&d0)), ("m0".into(), 0));
    assert_eq!((body(&d1), offset_header(&d1)), ("m1".into(), 1));
    no_delivery(&mut a).await;
    // A reject with requeue is an ack here: m0 does not come back.
    a.reject(d0.tag, true).unwrap();
    assert_eq!(body(&next_delivery(&mut a).await), "m2");
    let got: Vec<String> = vec![
        body(&next_delivery(&mut b).await),
        body(&next_delivery(&mut b).await),
    ];
    assert_eq!(got, ["m3", "m4"]);
    no_delivery(&mut b).await;
    // Everything is still there, and a peek shows the oldest.
    assert_eq!(broker.queue_info("/", "s").unwrap().ready, 5);
    let peeked: Vec<u64> = broker
        .peek("/", "s", 3, conn)
        .unwrap()
        .iter()
        .map(|p| p.offset)
        .collect();
    assert_eq!(peeked, [0, 1, 2]);
    // Timestamps and intervals: the epoch and an hour ago mean everything;
    // the far future means what comes next.
    for (spec, first) in [
        (FieldValue::Timestamp(0), Some("m0")),
        (s("1h"), Some("m0")),
        (FieldValue::Timestamp(u64::from(u32::MAX) * 2), None),
        (s("last"), Some("m4")),
        (s("next"), None),
        (FieldValue::I64(-7), Some("m0")),
        (FieldValue::I64(1000), None),
    ] {
        let mut c = broker.open_channel("/", conn).unwrap();
        c.qos(1, false);
        c.consume("s", consume_args(&[("x-stream-offset", spec.clone())]))
            .unwrap();
        match first {
            Some(m) => assert_eq!(body(&next_delivery(&mut c).await), m, "{spec:?}"),
            None => no_delivery(&mut c).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_removes_whole_segments_by_bytes_and_by_age() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let conn = broker.new_connection_id();
    let args = |extra: (&str, FieldValue)| {
        stream(
            "x",
            &[
                ("x-stream-max-segment-size-bytes", FieldValue::I32(4096)),
                extra,
            ],
        )
    };
    let mut by_bytes = args(("x-max-length-bytes", FieldValue::I64(20_000)));
    by_bytes.name = "by-bytes".into();
    let mut by_age = args(("x-max-age", s("1h")));
    by_age.name = "by-age".into();
    broker.declare_queue("/", by_bytes, conn).await.unwrap();
    broker.declare_queue("/", by_age, conn).await.unwrap();
    let body = "x".repeat(1000);
    for _ in 0..100 {
        publish(&broker, "by-bytes", &body).await;
        publish(&broker, "by-age", &body).await;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    broker.apply_stream_retention("/", "by-bytes", now).unwrap();
    let held = broker.stream_offsets("/", "by-bytes").unwrap();
    assert_eq!(held.end, 100);
    // About 20 KB kept out of 100 KB, by whole 4 KiB segments.
    assert!(
        held.first > 60 && held.first < 90,
        "first is {}",
        held.first
    );
    // A consumer starting at "first" starts at what is left.
    let mut c = broker.open_channel("/", conn).unwrap();
    c.qos(1, false);
    c.consume("by-bytes", consume_args(&[("x-stream-offset", s("first"))]))
        .unwrap();
    assert_eq!(
        offset_header(&next_delivery(&mut c).await),
        held.first as i64
    );

    // By age: nothing is an hour old now; two hours on, every sealed
    // segment is, and only the active one stays.
    broker.apply_stream_retention("/", "by-age", now).unwrap();
    assert_eq!(broker.stream_offsets("/", "by-age").unwrap().first, 0);
    broker
        .apply_stream_retention("/", "by-age", now + 2 * 3_600_000)
        .unwrap();
    let aged = broker.stream_offsets("/", "by-age").unwrap();
    assert!(
        aged.first > 90 && aged.first < 100,
        "first is {}",
        aged.first
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_streams_task_applies_retention_once_appends_start_new_segments() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let conn = broker.new_connection_id();
    let d = stream(
        "s",
        &[
            ("x-stream-max-segment-size-bytes", FieldValue::I32(4096)),
            ("x-max-length-bytes", FieldValue::I64(10_000)),
        ],
    );
    broker.declare_queue("/", d, conn).await.unwrap();
    let body = "x".repeat(1000);
    for _ in 0..60 {
        publish(&broker, "s", &body).await;
    }
    // Nobody calls apply_stream_retention here: the task does.
    tokio::time::timeout(Duration::from_secs(5), async {
        while broker.stream_offsets("/", "s").unwrap().first == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("retention ran after appends crossed segments");
    let o = broker.stream_offsets("/", "s").unwrap();
    assert!(o.first > 30, "first is {}", o.first);
    assert_eq!(broker.queue_info("/", "s").unwrap().ready, o.end - o.first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_offsets_survive_a_restart_and_unacked_messages_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let named = |extra: Option<(&str, FieldValue)>| {
        let mut args = vec![("x-stream-consumer-name", s("billing"))];
        args.extend(extra);
        consume_args(&args)
    };
    {
        let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
        let conn = broker.new_connection_id();
        broker
            .declare_queue("/", stream("s", &[]), conn)
            .await
            .unwrap();
        for i in 0..6 {
            publish(&broker, "s", &format!("m{i}")).await;
        }
        let mut ch = broker.open_channel("/", conn).unwrap();
        ch.qos(4, false);
        ch.consume("s", named(Some(("x-stream-offset", s("first")))))
            .unwrap();
        let d: Vec<Delivery> = vec![
            next_delivery(&mut ch).await,
            next_delivery(&mut ch).await,
            next_delivery(&mut ch).await,
            next_delivery(&mut ch).await,
        ];
        // m0 and m1 acked, m2 not, m3 acked: the commit stops at m2.
        ch.ack(d[1].tag, true).unwrap();
        ch.ack(d[3].tag, false).unwrap();
        let offsets = broker.stream_offsets("/", "s").unwrap();
        let billing = &offsets.consumers[0];
        assert_eq!(billing.committed, Some(2));
        assert_eq!(billing.lag, 4);
        // A second consumer of the same name is refused while it is attached.
        let mut other = broker.open_channel("/", conn).unwrap();
        other.qos(1, false);
        assert!(other.consume("s", named(None)).is_err());
        drop(ch);
        // Away: its committed offset is still listed.
        let offsets = broker.stream_offsets("/", "s").unwrap();
        assert_eq!(offsets.consumers.len(), 1);
        assert_eq!(offsets.consumers[0].consumer_tag, None);
        assert_eq!(offsets.consumers[0].committed, Some(2));
        broker.close().unwrap();
    }
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let conn = broker.new_connection_id();
    assert_eq!(
        broker.queue_info("/", "s").unwrap().queue_type,
        QueueType::Stream
    );
    let mut ch = broker.open_channel("/", conn).unwrap();
    ch.qos(10, false);
    ch.consume("s", named(None)).unwrap();
    // Resumes at the first unacked message; m3 comes again (at least once).
    let mut got: Vec<(String, i64)> = Vec::new();
    for _ in 0..4 {
        let d = next_delivery(&mut ch).await;
        got.push((body(&d), offset_header(&d)));
    }
    assert_eq!(
        got,
        [
            ("m2".to_string(), 2),
            ("m3".to_string(), 3),
            ("m4".to_string(), 4),
            ("m5".to_string(), 5)
        ]
    );
    no_delivery(&mut ch).await;
    // An unnamed consumer without an offset starts at the end, as RabbitMQ's.
    let mut fresh = broker.open_channel("/", conn).unwrap();
    fresh.qos(10, false);
    fresh.consume("s", ConsumeOptions::default()).unwrap();
    no_delivery(&mut fresh).await;
    publish(&broker, "s", "m6").await;
    assert_eq!(body(&next_delivery(&mut fresh).await), "m6");
}

// ---- the model ----

#[derive(Debug, Clone)]
enum Spec {
    First,
    Last,
    Next,
    Offset(u64),
    /// No `x-stream-offset`: a named consumer resumes from its commit.
    Resume,
}

#[derive(Debug, Clone)]
enum Op {
    Publish(u8),
    /// Attach consumer slot `slot` (named after the slot when `named`).
    Attach {
        slot: usize,
        spec: Spec,
        named: bool,
        prefetch: u16,
    },
    /// Receive and ack up to `n` deliveries of the slot's consumer.
    Read {
        slot: usize,
        n: u8,
    },
    Detach(usize),
}

const SLOTS: usize = 3;

fn op() -> impl Strategy<Value = Op> {
    let spec = prop_oneof![
        Just(Spec::First),
        Just(Spec::Last),
        Just(Spec::Next),
        (0u64..30).prop_map(Spec::Offset),
        Just(Spec::Resume),
    ];
    prop_oneof![
        (1u8..6).prop_map(Op::Publish),
        (0..SLOTS, spec, any::<bool>(), 1u16..5).prop_map(|(slot, spec, named, prefetch)| {
            Op::Attach {
                slot,
                spec,
                named,
                prefetch,
            }
        }),
        (0..SLOTS, 1u8..8).prop_map(|(slot, n)| Op::Read { slot, n }),
        (0..SLOTS).prop_map(Op::Detach),
    ]
}

struct Slot {
    channel: Channel,
    /// The model's position: the next offset this consumer receives.
    position: u64,
    named: bool,
}

fn run_model(ops: &[Op]) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
        let conn = broker.new_connection_id();
        broker
            .declare_queue("/", stream("s", &[]), conn)
            .await
            .unwrap();
        let mut log: Vec<String> = Vec::new();
        let mut committed: [Option<u64>; SLOTS] = [None; SLOTS];
        let mut slots: Vec<Option<Slot>> = (0..SLOTS).map(|_| None).collect();
        for op in ops {
            match op {
                Op::Publish(n) => {
                    for _ in 0..*n {
                        let body = format!("m{}", log.len());
                        publish(&broker, "s", &body).await;
                        log.push(body);
                    }
                }
                Op::Attach {
                    slot,
                    spec,
                    named,
                    prefetch,
                } => {
                    if slots[*slot].is_some() {
                        continue;
                    }
                    let end = log.len() as u64;
                    // A name's commit wins over any x-stream-offset, which
                    // only places a name that has none yet.
                    let position = match (committed[*slot].filter(|_| *named), spec) {
                        (Some(at), _) => at,
                        (None, Spec::First) => 0,
                        (None, Spec::Last) => end.saturating_sub(1),
                        (None, Spec::Next | Spec::Resume) => end,
                        (None, Spec::Offset(o)) => (*o).min(end),
                    };
                    let mut args = Vec::new();
                    let name = format!("c{slot}");
                    if *named {
                        args.push(("x-stream-consumer-name", s(&name)));
                    }
                    match spec {
                        Spec::First => args.push(("x-stream-offset", s("first"))),
                        Spec::Last => args.push(("x-stream-offset", s("last"))),
                        Spec::Next => args.push(("x-stream-offset", s("next"))),
                        Spec::Offset(o) => {
                            args.push(("x-stream-offset", FieldValue::I64(*o as i64)))
                        }
                        Spec::Resume => {}
                    }
                    let mut channel = broker.open_channel("/", conn).unwrap();
                    channel.qos(*prefetch, false);
                    channel.consume("s", consume_args(&args)).unwrap();
                    slots[*slot] = Some(Slot {
                        channel,
                        position,
                        named: *named,
                    });
                }
                Op::Read { slot, n } => {
                    let Some(st) = slots[*slot].as_mut() else {
                        continue;
                    };
                    let available = log.len() as u64 - st.position;
                    let count = u64::from(*n).min(available);
                    for _ in 0..count {
                        let d = next_delivery(&mut st.channel).await;
                        assert_eq!(offset_header(&d) as u64, st.position);
                        assert_eq!(body(&d), log[st.position as usize]);
                        assert!(!d.redelivered);
                        st.channel.ack(d.tag, false).unwrap();
                        st.position += 1;
                    }
                    if st.named {
                        // Only acks commit.
                        if count > 0 {
                            committed[*slot] = Some(st.position);
                        }
                        let offsets = broker.stream_offsets("/", "s").unwrap();
                        let name = format!("c{slot}");
                        let c = offsets
                            .consumers
                            .iter()
                            .find(|c| c.name.as_ref().map(|n| n.as_str()) == Some(name.as_str()))
                            .unwrap();
                        assert_eq!(c.committed, committed[*slot]);
                        if let Some(at) = committed[*slot] {
                            assert_eq!(c.lag, log.len() as u64 - at);
                        }
                    }
                }
                Op::Detach(slot) => {
                    // Unacked deliveries lapse; the commit stays where acks left it.
                    slots[*slot] = None;
                }
            }
        }
        // Every consumer still attached reads the rest, exactly, then nothing.
        for st in slots.iter_mut().flatten() {
            while st.position < log.len() as u64 {
                let d = next_delivery(&mut st.channel).await;
                assert_eq!(offset_header(&d) as u64, st.position);
                assert_eq!(body(&d), log[st.position as usize]);
                st.channel.ack(d.tag, false).unwrap();
                st.position += 1;
            }
            no_delivery(&mut st.channel).await;
        }
        assert_eq!(broker.queue_info("/", "s").unwrap().ready, log.len() as u64);
    });
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 32,
        ..ProptestConfig::default()
    })]

    #[test]
    fn streams_behave_like_the_model(ops in prop::collection::vec(op(), 1..40)) {
        run_model(&ops);
    }
}
