//! FIFO message groups (`x-message-group-header`), through the broker's
//! in-process API: a group has at most one message out at a time, its
//! messages go in publish order (a returned one first again), and other
//! groups and ungrouped messages are not held back. A proptest drives
//! random publishes, consumer deliveries, gets, acks, nacks, rejects,
//! channel closes and restarts against a model; the other tests pin down
//! `get`, dead-lettering, expiry, purge, restart and the refusals.

#![allow(clippy::unwrap_used)] // a test helper that fails should panic

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proptest::prelude::*;
use tern_broker::*;

const HEADER: &str = "x-group";

fn grouped_queue(name: &str) -> QueueDeclare {
    let mut d = QueueDeclare::new(name);
    d.arguments.insert(
        "x-message-group-header".into(),
        FieldValue::String(HEADER.into()),
    );
    d
}

fn message(queue: &str, body: &str, group: Option<&str>) -> Message {
    let mut properties = Properties::default();
    if let Some(g) = group {
        let mut headers = FieldTable::new();
        headers.insert(HEADER.into(), FieldValue::String(g.into()));
        properties.headers = Some(headers);
    }
    Message {
        exchange: ExchangeName::default_exchange(),
        routing_key: queue.to_string(),
        properties,
        body: Bytes::copy_from_slice(body.as_bytes()),
    }
}

async fn publish(broker: &Broker, m: Message) {
    let published = broker.publish("/", m).unwrap();
    assert_eq!(published.routed, 1);
    published.confirmed().await.unwrap();
}

fn body(m: &Message) -> String {
    String::from_utf8(m.body.to_vec()).unwrap()
}

fn get_body(ch: &mut Channel, queue: &str) -> Option<(DeliveryTag, String, bool)> {
    ch.get(queue, false)
        .unwrap()
        .map(|g| (g.tag, body(&g.message), g.redelivered))
}

async fn open(dir: &Path) -> (Broker, ConnectionId) {
    let broker = Broker::open(BrokerConfig::new(dir)).unwrap();
    let conn = broker.new_connection_id();
    broker
        .declare_queue("/", grouped_queue("q"), conn)
        .await
        .unwrap();
    (broker, conn)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_respects_the_group_lock_and_a_requeued_message_goes_first() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, conn) = open(dir.path()).await;
    for (b, g) in [
        ("a1", Some("A")),
        ("a2", Some("A")),
        ("b1", Some("B")),
        ("n1", None),
    ] {
        publish(&broker, message("q", b, g)).await;
    }
    let mut ch = broker.open_channel("/", conn).unwrap();
    let (a1, body_a1, _) = get_body(&mut ch, "q").unwrap();
    assert_eq!(body_a1, "a1");
    let (b1, body_b1, _) = get_body(&mut ch, "q").unwrap();
    assert_eq!(body_b1, "b1");
    let (n1, body_n1, _) = get_body(&mut ch, "q").unwrap();
    assert_eq!(body_n1, "n1");
    // a2 is ready but its group has a1 out.
    assert!(get_body(&mut ch, "q").is_none());
    let peeked: Vec<String> = broker
        .peek("/", "q", 10, conn)
        .unwrap()
        .iter()
        .map(|p| body(&p.message))
        .collect();
    assert_eq!(peeked, ["a2"], "a peek shows the ready messages");
    assert_eq!(broker.queue_info("/", "q").unwrap().ready, 1);
    // Returned, a1 is A's next message again, redelivered.
    ch.nack(a1, false, true).unwrap();
    let (a1, body_a1, redelivered) = get_body(&mut ch, "q").unwrap();
    assert_eq!((body_a1.as_str(), redelivered), ("a1", true));
    assert!(get_body(&mut ch, "q").is_none());
    ch.ack(a1, false).unwrap();
    let (a2, body_a2, _) = get_body(&mut ch, "q").unwrap();
    assert_eq!(body_a2, "a2");
    ch.ack(a2, false).unwrap();
    ch.ack(b1, false).unwrap();
    ch.ack(n1, false).unwrap();
    let info = broker.queue_info("/", "q").unwrap();
    assert_eq!((info.ready, info.unacked), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumers_take_different_groups_in_parallel_and_one_group_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, conn) = open(dir.path()).await;
    let mut c1 = broker.open_channel("/", conn).unwrap();
    let mut c2 = broker.open_channel("/", conn).unwrap();
    c1.qos(10, false);
    c2.qos(10, false);
    c1.consume("q", ConsumeOptions::default()).unwrap();
    c2.consume("q", ConsumeOptions::default()).unwrap();
    // Round-robin: a0 goes to one consumer, b0 to the other; the rest wait
    // for their groups although both consumers have credit.
    for i in 0..3 {
        publish(&broker, message("q", &format!("a{i}"), Some("A"))).await;
        publish(&broker, message("q", &format!("b{i}"), Some("B"))).await;
    }
    // Each group has exactly one message out, whoever holds it: a0 and b0.
    let first = next(&mut c1).await;
    let second = next(&mut c2).await;
    let mut out = [body(&first.message), body(&second.message)];
    out.sort();
    assert_eq!(out, ["a0", "b0"]);
    nothing(&mut c1).await;
    nothing(&mut c2).await;
    // Closing c1 returns its message, which c2 then gets before the next one.
    let c1_group = body(&first.message);
    c1.close();
    let again = next(&mut c2).await;
    assert_eq!(body(&again.message), c1_group);
    assert!(again.redelivered);
    let mut seen: Vec<String> = vec![body(&second.message), body(&again.message)];
    let mut held = vec![second.tag, again.tag];
    while seen.len() < 6 {
        c2.ack(held.remove(0), false).unwrap();
        let d = next(&mut c2).await;
        seen.push(body(&d.message));
        held.push(d.tag);
    }
    let of =
        |g: char| -> Vec<String> { seen.iter().filter(|b| b.starts_with(g)).cloned().collect() };
    assert_eq!(of('a'), ["a0", "a1", "a2"]);
    assert_eq!(of('b'), ["b0", "b1", "b2"]);
}

async fn next(ch: &mut Channel) -> Delivery {
    match tokio::time::timeout(Duration::from_secs(5), ch.recv()).await {
        Ok(Some(ChannelEvent::Delivery(d))) => d,
        other => panic!("expected a delivery, got {other:?}"),
    }
}

async fn nothing(ch: &mut Channel) {
    if let Ok(ev) = tokio::time::timeout(Duration::from_millis(150), ch.recv()).await {
        panic!("expected no delivery, got {ev:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_lettered_or_expired_message_releases_its_group() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let conn = broker.new_connection_id();
    broker
        .declare_queue("/", QueueDeclare::new("dead"), conn)
        .await
        .unwrap();
    let mut d = grouped_queue("q");
    d.arguments.insert(
        "x-dead-letter-exchange".into(),
        FieldValue::String("".into()),
    );
    d.arguments.insert(
        "x-dead-letter-routing-key".into(),
        FieldValue::String("dead".into()),
    );
    broker.declare_queue("/", d, conn).await.unwrap();
    publish(&broker, message("q", "a1", Some("A"))).await;
    let mut short = message("q", "a2", Some("A"));
    short.properties.expiration = Some("1".into());
    publish(&broker, short).await;
    publish(&broker, message("q", "a3", Some("A"))).await;
    let mut ch = broker.open_channel("/", conn).unwrap();
    let (a1, b, _) = get_body(&mut ch, "q").unwrap();
    assert_eq!(b, "a1");
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(get_body(&mut ch, "q").is_none());
    // Rejected without requeue: dead-lettered, and the group moves on. a2
    // expired meanwhile, so it is dead-lettered too and a3 comes next.
    ch.reject(a1, false).unwrap();
    let (a3, b, _) = get_body(&mut ch, "q").unwrap();
    assert_eq!(b, "a3");
    ch.ack(a3, false).unwrap();
    // Dead letters are republished by the broker after the queue's lock is
    // released: wait for both.
    let mut dead = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while dead.len() < 2 && Instant::now() < deadline {
        match ch.get("dead", true).unwrap() {
            Some(g) => dead.push(body(&g.message)),
            None => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    assert_eq!(dead, ["a1", "a2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_keeps_the_lock_of_a_message_out() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, conn) = open(dir.path()).await;
    publish(&broker, message("q", "a1", Some("A"))).await;
    publish(&broker, message("q", "a2", Some("A"))).await;
    let mut ch = broker.open_channel("/", conn).unwrap();
    let (a1, _, _) = get_body(&mut ch, "q").unwrap();
    assert_eq!(broker.purge_queue("/", "q", conn).unwrap(), 1);
    publish(&broker, message("q", "a3", Some("A"))).await;
    assert!(get_body(&mut ch, "q").is_none());
    ch.ack(a1, false).unwrap();
    assert_eq!(get_body(&mut ch, "q").unwrap().1, "a3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_unacked_messages_come_back_in_group_order() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (broker, conn) = open(dir.path()).await;
        for (b, g) in [("a1", "A"), ("a2", "A"), ("b1", "B"), ("b2", "B")] {
            publish(&broker, message("q", b, Some(g))).await;
        }
        let mut ch = broker.open_channel("/", conn).unwrap();
        let (a1, _, _) = get_body(&mut ch, "q").unwrap();
        let (_b1, _, _) = get_body(&mut ch, "q").unwrap();
        ch.ack(a1, false).unwrap();
        let (a2, b, _) = get_body(&mut ch, "q").unwrap();
        assert_eq!(b, "a2");
        let _ = a2;
        // Closed with a2 and b1 out.
        drop(ch);
        broker.close().unwrap();
    }
    let (broker, conn) = open(dir.path()).await;
    let mut ch = broker.open_channel("/", conn).unwrap();
    let got: Vec<(String, bool)> = std::iter::from_fn(|| get_body(&mut ch, "q"))
        .map(|(_, b, r)| (b, r))
        .collect();
    assert_eq!(
        got,
        [("a2".to_string(), true), ("b1".to_string(), true)],
        "one per group, the unacked ones first"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_group_arguments_are_refused_naming_the_argument() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let conn = broker.new_connection_id();
    let with = |pairs: &[(&str, FieldValue)]| {
        let mut d = QueueDeclare::new("bad");
        for (k, v) in pairs {
            d.arguments.insert((*k).into(), v.clone());
        }
        d
    };
    for d in [
        with(&[("x-message-group-header", FieldValue::String(String::new()))]),
        with(&[("x-message-group-header", FieldValue::Bool(true))]),
        with(&[(
            "x-message-group-header",
            FieldValue::String("x".repeat(256)),
        )]),
        with(&[
            ("x-message-group-header", FieldValue::String("g".into())),
            ("x-max-priority", FieldValue::I32(3)),
        ]),
        with(&[
            ("x-message-group-header", FieldValue::String("g".into())),
            ("x-queue-type", FieldValue::String("stream".into())),
        ]),
    ] {
        let err = broker.declare_queue("/", d, conn).await.unwrap_err();
        assert_eq!(err.reply_code(), ReplyCode::PreconditionFailed, "{err}");
        assert!(err.to_string().contains("x-message-group-header"), "{err}");
    }
}

/// One step of the model test.
#[derive(Debug, Clone)]
enum Op {
    /// Publish a message of group `Some(g)`, or of none.
    Publish(Option<u8>),
    /// Take what the consumer on channel `c` was delivered.
    Receive(usize),
    /// `basic.get` on the channel without a consumer.
    Get,
    /// Ack, nack with requeue, or reject a held message of channel `c`.
    Ack(usize, usize),
    Nack(usize, usize),
    Reject(usize, usize),
    /// Close channel `c` (its messages return) and open it again.
    Close(usize),
    /// Close the broker (channels first) and open it again.
    Restart,
}

/// Channels 0 and 1 consume; channel 2 only gets.
const CHANNELS: usize = 3;
const GET: usize = 2;

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => prop::option::weighted(0.8, 0u8..4).prop_map(Op::Publish),
        3 => (0..GET).prop_map(Op::Receive),
        1 => Just(Op::Get),
        3 => (0..CHANNELS, any::<usize>()).prop_map(|(c, k)| Op::Ack(c, k)),
        1 => (0..CHANNELS, any::<usize>()).prop_map(|(c, k)| Op::Nack(c, k)),
        1 => (0..CHANNELS, any::<usize>()).prop_map(|(c, k)| Op::Reject(c, k)),
        1 => (0..CHANNELS).prop_map(Op::Close),
        1 => Just(Op::Restart),
    ]
}

/// What the test knows: every message by id (its body), its group, and
/// who holds what.
#[derive(Default)]
struct Model {
    /// Not yet acked or rejected, with their groups.
    unsettled: BTreeMap<u64, Option<u8>>,
    settled: HashSet<u64>,
    /// Held (received, not settled) per channel.
    held: [Vec<(DeliveryTag, u64)>; CHANNELS],
    next_id: u64,
}

impl Model {
    /// Checks a delivery against the model and records it as held.
    fn delivered(&mut self, c: usize, tag: DeliveryTag, m: &Message) {
        let id: u64 = body(m).parse().unwrap();
        assert!(
            !self.settled.contains(&id),
            "{id} delivered after it was settled"
        );
        let group = *self.unsettled.get(&id).unwrap();
        for h in &self.held {
            assert!(h.iter().all(|(_, o)| *o != id), "{id} delivered twice");
        }
        if let Some(g) = group {
            for h in &self.held {
                assert!(
                    h.iter()
                        .all(|(_, o)| self.unsettled.get(o) != Some(&Some(g))),
                    "{id} of group {g} delivered while another of its group is out"
                );
            }
            let oldest = self
                .unsettled
                .iter()
                .find(|(_, gg)| **gg == Some(g))
                .map(|(o, _)| *o);
            assert_eq!(
                oldest,
                Some(id),
                "group {g} must deliver its oldest unsettled message"
            );
        }
        self.held[c].push((tag, id));
    }

    fn pick(&mut self, c: usize, k: usize) -> Option<(DeliveryTag, u64)> {
        let held = &mut self.held[c];
        if held.is_empty() {
            return None;
        }
        let i = k % held.len();
        Some(held.remove(i))
    }

    fn settle(&mut self, id: u64) {
        self.unsettled.remove(&id);
        assert!(self.settled.insert(id), "{id} settled twice");
    }
}

struct World {
    broker: Option<Broker>,
    conn: ConnectionId,
    channels: Vec<Option<Channel>>,
}

impl World {
    async fn open(dir: &Path, prefetch: u16) -> World {
        let (broker, conn) = open(dir).await;
        let mut w = World {
            broker: Some(broker),
            conn,
            channels: Vec::new(),
        };
        for c in 0..CHANNELS {
            let ch = w.channel(c, prefetch);
            w.channels.push(Some(ch));
        }
        w
    }

    fn broker(&self) -> &Broker {
        self.broker.as_ref().unwrap()
    }

    fn channel(&self, c: usize, prefetch: u16) -> Channel {
        let mut ch = self.broker().open_channel("/", self.conn).unwrap();
        if c != GET {
            ch.qos(prefetch, false);
            ch.consume("q", ConsumeOptions::default()).unwrap();
        }
        ch
    }

    fn ch(&mut self, c: usize) -> &mut Channel {
        self.channels[c].as_mut().unwrap()
    }

    async fn close(mut self) {
        for ch in self.channels.drain(..).flatten() {
            ch.close();
        }
        self.broker.take().unwrap().close().unwrap();
    }
}

/// Takes every delivery that reaches channel `c` within a short while.
async fn receive(w: &mut World, model: &mut Model, c: usize) {
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_millis(20), w.ch(c).recv()).await {
        if let ChannelEvent::Delivery(d) = ev {
            model.delivered(c, d.tag, &d.message);
        }
    }
}

async fn run(ops: Vec<Op>, prefetch: u16) {
    let dir = tempfile::tempdir().unwrap();
    let mut w = World::open(dir.path(), prefetch).await;
    let mut model = Model::default();
    for op in ops {
        match op {
            Op::Publish(g) => {
                let id = model.next_id;
                model.next_id += 1;
                let group = g.map(|g| format!("G{g}"));
                model.unsettled.insert(id, g);
                publish(w.broker(), message("q", &id.to_string(), group.as_deref())).await;
            }
            Op::Receive(c) => receive(&mut w, &mut model, c).await,
            Op::Get => {
                if let Some(g) = w.ch(GET).get("q", false).unwrap() {
                    model.delivered(GET, g.tag, &g.message);
                }
            }
            Op::Ack(c, k) => {
                if let Some((tag, id)) = model.pick(c, k) {
                    w.ch(c).ack(tag, false).unwrap();
                    model.settle(id);
                }
            }
            Op::Nack(c, k) => {
                if let Some((tag, _)) = model.pick(c, k) {
                    w.ch(c).nack(tag, false, true).unwrap();
                }
            }
            Op::Reject(c, k) => {
                if let Some((tag, id)) = model.pick(c, k) {
                    w.ch(c).reject(tag, false).unwrap();
                    model.settle(id);
                }
            }
            Op::Close(c) => {
                w.channels[c].take().unwrap().close();
                model.held[c].clear();
                let ch = w.channel(c, prefetch);
                w.channels[c] = Some(ch);
            }
            Op::Restart => {
                w.close().await;
                for h in &mut model.held {
                    h.clear();
                }
                w = World::open(dir.path(), prefetch).await;
            }
        }
    }
    // Drain: ack everything held and take what comes, until every message
    // was acked or rejected exactly once.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !model.unsettled.is_empty() {
        assert!(
            Instant::now() < deadline,
            "messages never delivered: {:?}",
            model.unsettled
        );
        for c in 0..CHANNELS {
            while let Some((tag, id)) = model.pick(c, 0) {
                w.ch(c).ack(tag, false).unwrap();
                model.settle(id);
            }
        }
        for c in 0..GET {
            receive(&mut w, &mut model, c).await;
        }
        if let Some(g) = w.ch(GET).get("q", false).unwrap() {
            model.delivered(GET, g.tag, &g.message);
        }
    }
    assert_eq!(model.settled.len() as u64, model.next_id);
    let info = w.broker().queue_info("/", "q").unwrap();
    assert_eq!((info.ready, info.unacked), (0, 0));
    w.close().await;
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn groups_follow_the_model(ops in prop::collection::vec(op(), 1..60), prefetch in 1u16..4) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(run(ops, prefetch));
    }
}

/// How messages are spread over groups in [`report_consume_rates`].
#[derive(Debug, Clone, Copy)]
enum Layout {
    /// No group header, on a queue without groups: the baseline.
    Plain,
    /// Message `i` is in group `i % groups`.
    Interleaved,
    /// Runs: the first `n / groups` messages in group 0, and so on, so a
    /// consumer finds most of the backlog behind groups already out.
    Runs,
}

/// Publishes `n` messages over `groups` groups, then consumes them with
/// two channels (prefetch 100 each) acking every delivery, and prints how
/// long each part took. Reports, never asserts: run it with
/// `cargo test --release -p tern-broker --test message_groups -- --ignored --nocapture`
/// (`TERN_GROUPS_BENCH_N` changes the message count, default 1,000,000).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a test: run it with --release and --ignored"]
async fn report_consume_rates() {
    let n: u64 = std::env::var("TERN_GROUPS_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let groups = 10_000u64;
    for layout in [Layout::Plain, Layout::Interleaved, Layout::Runs] {
        let dir = tempfile::tempdir().unwrap();
        let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
        let conn = broker.new_connection_id();
        let declare = match layout {
            Layout::Plain => QueueDeclare::new("q"),
            _ => grouped_queue("q"),
        };
        broker.declare_queue("/", declare, conn).await.unwrap();
        let started = Instant::now();
        let mut pending = Vec::new();
        for i in 0..n {
            let group = match layout {
                Layout::Plain => None,
                Layout::Interleaved => Some(format!("g{}", i % groups)),
                Layout::Runs => Some(format!("g{}", i / (n / groups).max(1))),
            };
            pending.push(
                broker
                    .publish("/", message("q", "x", group.as_deref()))
                    .unwrap(),
            );
            if pending.len() == 10_000 {
                for p in pending.drain(..) {
                    p.confirmed().await.unwrap();
                }
            }
        }
        for p in pending.drain(..) {
            p.confirmed().await.unwrap();
        }
        let published = started.elapsed();
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..2 {
            let mut ch = broker.open_channel("/", conn).unwrap();
            ch.qos(100, false);
            ch.consume("q", ConsumeOptions::default()).unwrap();
            tasks.push(tokio::spawn(async move {
                let mut count = 0u64;
                while let Ok(Some(ChannelEvent::Delivery(d))) =
                    tokio::time::timeout(Duration::from_secs(2), ch.recv()).await
                {
                    ch.ack(d.tag, false).unwrap();
                    count += 1;
                }
                count
            }));
        }
        let mut consumed = 0;
        for t in tasks {
            consumed += t.await.unwrap();
        }
        // The consumers stop 2 s after the last delivery.
        let took = started.elapsed().saturating_sub(Duration::from_secs(2));
        println!(
            "{layout:?}: {n} messages over {groups} groups: published in {published:.2?}, \
             {consumed} consumed and acked in {took:.2?} ({:.0}/s)",
            consumed as f64 / took.as_secs_f64()
        );
        broker.close().unwrap();
    }
}
