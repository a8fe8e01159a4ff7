//! Stream offsets across SIGKILLs of a real `tern serve`: a property test
//! against a model of the log and of one named consumer's committed offset.
//!
//! Each case runs a few rounds. In a round a publisher appends to a stream
//! (some batches waiting for their confirms, some not), and a consumer
//! named with `x-stream-consumer-name` takes deliveries and acks some of
//! them, in any order, with an occasional round trip on its channel (after
//! which the broker has handled every ack sent before it). Then the broker
//! is SIGKILLed wherever the round happens to be and restarted on the same
//! data directory, and the test checks:
//!
//! - the log: what was there before is unchanged at the same offsets, and
//!   the round's publishes follow as a prefix of their publish order (no
//!   gap, nothing twice, nothing foreign) that holds every confirmed one;
//! - the named consumer's committed offset: at or after what it had
//!   committed by its last round trip (a commit is written before the ack
//!   is handled, so a handled ack survives a process crash), and never past
//!   the lowest offset it had not acked (no message skipped);
//! - attaching again by name alone resumes exactly there.
//!
//! `PROPTEST_CASES` sets the number of cases (8 by default, each about
//! four broker starts).

#![allow(clippy::unwrap_used)] // a test helper that fails should panic

mod support;

use std::collections::{BTreeSet, VecDeque};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::pin::Pin;
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::message::Delivery;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::PublisherConfirm;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use proptest::prelude::*;
use support::Serve;

const STREAM: &str = "crash.stream";
const CONSUMER: &str = "billing";
/// The named consumer's prefetch; it never holds more unacked than this.
const PREFETCH: u16 = 64;

/// One step of a round.
#[derive(Debug, Clone)]
enum Op {
    /// Publishes this many messages and waits for every confirm.
    Publish(usize),
    /// Publishes this many messages without waiting for their confirms.
    PublishNoWait(usize),
    /// Takes one delivery per entry (as many as are certainly in the log
    /// and the prefetch allows), acking those whose entry is true.
    Consume(Vec<bool>),
    /// Acks this many of the oldest deliveries still unacked.
    AckOldest(usize),
    /// A round trip on the consumer's channel: every ack sent before it is
    /// handled (and so committed) once it returns.
    RoundTrip,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (1usize..40).prop_map(Op::Publish),
        1 => (1usize..20).prop_map(Op::PublishNoWait),
        3 => prop::collection::vec(prop::bool::weighted(0.7), 0..30).prop_map(Op::Consume),
        1 => (1usize..10).prop_map(Op::AckOldest),
        2 => Just(Op::RoundTrip),
    ]
}

/// The lowest offset at or after `start` that is not in `acked`: what the
/// broker commits for a consumer that started at `start` and acked these.
fn lowest_unacked(start: u64, acked: &BTreeSet<u64>) -> u64 {
    let mut o = start;
    while acked.contains(&o) {
        o += 1;
    }
    o
}

/// What the test knows about the broker's state.
#[derive(Debug, Default)]
struct Model {
    /// The log as read back after the last restart, by offset.
    log: Vec<String>,
    /// This round's publishes, in publish order, and whether each is
    /// known to be confirmed.
    published: Vec<(String, bool)>,
    /// Where the named consumer's current attachment started (its
    /// committed offset when it attached).
    session_start: u64,
    /// Offsets acked in this attachment (all sent), and those sent before
    /// the last round trip.
    acked: BTreeSet<u64>,
    acked_by_round_trip: BTreeSet<u64>,
}

impl Model {
    /// The committed offset after a crash may be anything in this range.
    fn commit_bounds(&self) -> (u64, u64) {
        (
            lowest_unacked(self.session_start, &self.acked_by_round_trip),
            lowest_unacked(self.session_start, &self.acked),
        )
    }

    /// Offsets certainly in the log: every publish up to the last
    /// confirmed one (one channel appends in order).
    fn certainly_present(&self) -> u64 {
        let confirmed = self
            .published
            .iter()
            .rposition(|(_, c)| *c)
            .map_or(0, |i| i + 1);
        (self.log.len() + confirmed) as u64
    }

    /// The body the log holds at `offset`, if the model can say.
    fn body_at(&self, offset: u64) -> Option<&str> {
        let o = usize::try_from(offset).ok()?;
        match self.log.get(o) {
            Some(b) => Some(b),
            None => self.published.get(o - self.log.len()).map(|(b, _)| &**b),
        }
    }
}

/// `Basic base64("guest:guest")`.
const GUEST: &str = "Basic Z3Vlc3Q6Z3Vlc3Q=";

/// The stream's `(end, committed offset of CONSUMER)` from the HTTP API.
fn offsets(http: SocketAddr) -> (u64, Option<u64>) {
    let mut s = TcpStream::connect(http).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let path = format!("/api/queues/%2f/{STREAM}/offsets");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {http}\r\nAuthorization: {GUEST}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "GET {path}: {reply}");
    let body = reply.split_once("\r\n\r\n").unwrap().1;
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["first"], 0, "nothing is retention's to delete here: {v}");
    let committed = v["consumers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == CONSUMER)
        .and_then(|c| c["committed"].as_u64());
    (v["end"].as_u64().unwrap(), committed)
}

fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), v.clone());
    }
    t
}

fn stream_offset(d: &Delivery) -> u64 {
    match d
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-stream-offset").cloned())
    {
        Some(AMQPValue::LongLongInt(o)) => u64::try_from(o).unwrap(),
        other => panic!("expected an x-stream-offset long, got {other:?}"),
    }
}

async fn next_delivery(c: &mut lapin::Consumer) -> Delivery {
    tokio::time::timeout(Duration::from_secs(10), c.next())
        .await
        .expect("a delivery within 10 s")
        .expect("the consumer is open")
        .unwrap()
}

async fn connect(serve: &Serve) -> Connection {
    Connection::connect(&serve.amqp_url(), ConnectionProperties::default())
        .await
        .unwrap()
}

/// Reads the whole stream from `first` with an unnamed consumer.
async fn read_log(conn: &Connection, end: u64) -> Vec<String> {
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(1000, BasicQosOptions::default())
        .await
        .unwrap();
    let mut c = ch
        .basic_consume(
            STREAM.into(),
            "reader".into(),
            BasicConsumeOptions::default(),
            table(&[("x-stream-offset", AMQPValue::LongString("first".into()))]),
        )
        .await
        .unwrap();
    let mut log = Vec::new();
    while (log.len() as u64) < end {
        let d = next_delivery(&mut c).await;
        assert_eq!(stream_offset(&d), log.len() as u64, "offsets are dense");
        log.push(String::from_utf8(d.data.clone()).unwrap());
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    ch.close(200, "read".into()).await.unwrap();
    log
}

/// After a restart: checks the log and the committed offset against the
/// model, then makes the model match what is there.
async fn verify_after_restart(serve: &Serve, model: &mut Model) {
    let (end, committed) = offsets(serve.http);
    let conn = connect(serve).await;
    let log = read_log(&conn, end).await;
    conn.close(200, "verified".into()).await.unwrap();

    assert!(
        log.len() >= model.log.len() && log[..model.log.len()] == model.log[..],
        "what was in the log before the round is unchanged"
    );
    let round: Vec<&String> = log[model.log.len()..].iter().collect();
    let published: Vec<&String> = model.published.iter().map(|(b, _)| b).collect();
    assert!(
        round.len() <= published.len() && round[..] == published[..round.len()],
        "the round's messages are a prefix of its publishes: got {round:?}, published {published:?}"
    );
    let confirmed = model.certainly_present() as usize - model.log.len();
    assert!(
        round.len() >= confirmed,
        "every confirmed message survives: {} of the first {confirmed} (all confirmed or before one) are back",
        round.len()
    );

    let (lower, upper) = model.commit_bounds();
    let at = committed.unwrap_or(0);
    if committed.is_none() {
        assert_eq!(
            lower, 0,
            "a commit handled before a round trip survives: none left, expected at least {lower}"
        );
    }
    assert!(
        (lower..=upper).contains(&at),
        "the committed offset {at} is at or after what was committed by the last round trip \
         ({lower}) and not past the lowest unacked offset ({upper})"
    );

    model.log = log;
    model.published.clear();
    model.session_start = at;
    model.acked.clear();
    model.acked_by_round_trip.clear();
}

/// One round against a running broker; returns when every op ran, and the
/// caller SIGKILLs the broker.
async fn round(serve: &Serve, number: usize, ops: &[Op], model: &mut Model, fresh: bool) {
    let pub_conn = connect(serve).await;
    let publisher = pub_conn.create_channel().await.unwrap();
    if fresh {
        publisher
            .queue_declare(
                STREAM.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                table(&[("x-queue-type", AMQPValue::LongString("stream".into()))]),
            )
            .await
            .unwrap();
    }
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();

    let con_conn = connect(serve).await;
    let consumer_ch = con_conn.create_channel().await.unwrap();
    consumer_ch
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .unwrap();
    // By name alone: resume at the commit. With no commit yet a name alone
    // would start at `next`, so the first attachment asks for `first`.
    let mut args = vec![(
        "x-stream-consumer-name",
        AMQPValue::LongString(LongString::from(CONSUMER)),
    )];
    if model.session_start == 0 && offsets(serve.http).1.is_none() {
        args.push(("x-stream-offset", AMQPValue::LongString("first".into())));
    }
    let mut consumer = consumer_ch
        .basic_consume(
            STREAM.into(),
            "named".into(),
            BasicConsumeOptions::default(),
            table(&args),
        )
        .await
        .unwrap();

    let mut received = model.session_start;
    let mut unacked: VecDeque<Delivery> = VecDeque::new();
    let mut in_flight: Vec<(usize, Pin<Box<PublisherConfirm>>)> = Vec::new();
    let mut serial = 0usize;

    for op in ops {
        match op {
            Op::Publish(n) | Op::PublishNoWait(n) => {
                let wait = matches!(op, Op::Publish(_));
                let mut confirms = Vec::new();
                for _ in 0..*n {
                    let body = format!("r{number}-{serial}");
                    serial += 1;
                    let confirm = publisher
                        .basic_publish(
                            "".into(),
                            STREAM.into(),
                            BasicPublishOptions::default(),
                            body.as_bytes(),
                            BasicProperties::default().with_delivery_mode(2),
                        )
                        .await
                        .unwrap();
                    model.published.push((body, false));
                    confirms.push((model.published.len() - 1, Box::pin(confirm)));
                }
                if wait {
                    for (i, c) in confirms {
                        assert!(matches!(c.await.unwrap(), Confirmation::Ack(None)));
                        model.published[i].1 = true;
                    }
                } else {
                    in_flight.extend(confirms);
                }
            }
            Op::Consume(acks) => {
                let room = usize::from(PREFETCH) - unacked.len();
                let present = model.certainly_present().saturating_sub(received) as usize;
                for &ack in acks.iter().take(room.min(present)) {
                    let d = next_delivery(&mut consumer).await;
                    let at = stream_offset(&d);
                    assert_eq!(at, received, "the named consumer reads in offset order");
                    assert_eq!(
                        Some(String::from_utf8(d.data.clone()).unwrap().as_str()),
                        model.body_at(at),
                        "offset {at} holds the message published there"
                    );
                    received += 1;
                    if ack {
                        d.ack(BasicAckOptions::default()).await.unwrap();
                        model.acked.insert(at);
                    } else {
                        unacked.push_back(d);
                    }
                }
            }
            Op::AckOldest(n) => {
                for _ in 0..*n {
                    let Some(d) = unacked.pop_front() else { break };
                    let at = stream_offset(&d);
                    d.ack(BasicAckOptions::default()).await.unwrap();
                    model.acked.insert(at);
                }
            }
            Op::RoundTrip => {
                round_trip(&consumer_ch).await;
                model.acked_by_round_trip = model.acked.clone();
            }
        }
        // Confirms of earlier batches that arrived meanwhile.
        settle_ready(&mut in_flight, model).await;
    }
    settle_ready(&mut in_flight, model).await;
}

/// A synchronous method on the channel the acks went out on: the server
/// handles a channel's methods in order, so its reply follows every ack.
async fn round_trip(ch: &Channel) {
    ch.queue_declare(
        STREAM.into(),
        QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
}

/// Marks the publishes whose confirms have arrived, without waiting.
async fn settle_ready(in_flight: &mut Vec<(usize, Pin<Box<PublisherConfirm>>)>, model: &mut Model) {
    let mut still = Vec::new();
    for (i, mut c) in in_flight.drain(..) {
        match futures_lite::future::poll_once(&mut c).await {
            Some(Ok(Confirmation::Ack(None))) => model.published[i].1 = true,
            Some(other) => panic!("unexpected confirmation {other:?}"),
            None => still.push((i, c)),
        }
    }
    *in_flight = still;
}

fn run_case(data: &Path, rounds: &[Vec<Op>]) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut model = Model::default();
        for (n, ops) in rounds.iter().enumerate() {
            let serve = Serve::start(data);
            if n > 0 {
                verify_after_restart(&serve, &mut model).await;
            }
            round(&serve, n, ops, &mut model, n == 0).await;
            drop(serve); // SIGKILL, wherever the round is
        }
        let mut serve = Serve::start(data);
        verify_after_restart(&serve, &mut model).await;
        assert_eq!(serve.stop(), Some(0));
    });
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        // Each run starts the broker a few times: shrink briefly.
        max_shrink_iters: 32,
        ..ProptestConfig::default()
    })]

    #[test]
    fn stream_offsets_survive_sigkill(
        rounds in prop::collection::vec(prop::collection::vec(op(), 0..10), 1..4)
    ) {
        let dir = tempfile::tempdir().unwrap();
        run_case(&dir.path().join("data"), &rounds);
    }
}
